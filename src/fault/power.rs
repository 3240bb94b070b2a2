//! Power faults: pull the plug (SIGKILL QEMU) and power on again.

use super::{Fault, check, refused};
use crate::machine::Machine;
use crate::machine::events::{Record, names};
use crate::machine::procs;
use crate::machine::vm::State;
use crate::{Error, Result};
use nix::sys::signal::Signal;
use serde_json::json;
use std::time::Duration;

/// How long QEMU may take to die after SIGKILL and the supervisor to record it and exit.
const DEATH_TIMEOUT: Duration = Duration::from_secs(30);

impl Machine {
    /// Pull the plug: SIGKILL the QEMU process. No ACPI, no guest shutdown path, and whatever
    /// QEMU had not yet written (in-flight requests, dirty qcow2 metadata) is lost, as a disk's
    /// volatile cache would be; data QEMU had written sits in the host's page cache and
    /// survives, as a real disk's committed writes do. qcow2 orders refcount updates before the
    /// L2 entries that use them, so the worst outcome is leaked clusters (wasted space, no harm;
    /// `power_on` checks). Returns once the supervisor recorded `QEMU_EXITED` and exited.
    pub async fn power_cut(&self) -> Result<Record> {
        let f = Fault::PowerCut;
        let State::Running { supervisor, qemu } = self.vm.state() else {
            return Err(refused(
                f,
                &self.vm.name,
                "is already off",
                format!(
                    "power it on with `boma-qvm fault {} power-on`",
                    self.vm.name
                ),
            ));
        };
        if !crate::machine::vm::is_qemu_of(qemu, &self.vm.run) {
            return Err(Error::qemu(
                format!("pid {qemu} in qemu.pid is not {}'s QEMU", self.vm.name),
                "look at `boma-qvm status`; `boma-qvm prune` clears stale state",
            ));
        }
        let mut tail = self.vm.tail();
        let detail = format!(
            "SIGKILL to QEMU pid {qemu}: no ACPI, no guest shutdown, QEMU's unwritten caches lost"
        );
        self.injecting(f, detail, json!({"qemu_pid": qemu}), async {
            procs::signal(qemu, Signal::SIGKILL);
            tail.wait_for("QEMU_EXITED after the power cut", DEATH_TIMEOUT, |r| {
                r.is(names::QEMU_EXITED)
            })
            .await?;
            // The old supervisor removes the run dir's sockets and pid files on its way out; it
            // must be gone before anything powers the VM on again.
            if !procs::wait_gone(supervisor, DEATH_TIMEOUT).await {
                return Err(Error::qemu(
                    format!(
                        "{}'s supervisor (pid {supervisor}) did not exit after QEMU died",
                        self.vm.name
                    ),
                    "see supervisor.log in the run directory; `boma-qvm prune` clears it",
                ));
            }
            Ok(())
        })
        .await
    }

    /// Power the VM on again after a power cut (or shutdown): `qemu-img check` the overlay
    /// (recorded as a `DISK_CHECK` record; leaked clusters are only wasted space, corruption is
    /// refused), then boot the same overlay (`provision::start`: the network first). Returns
    /// once QEMU runs; the event cursor moves to this new boot, so waits after it do not trip
    /// over the previous QEMU's exit.
    pub async fn power_on(&self) -> Result<Record> {
        let f = Fault::PowerOn;
        if self.vm.is_running() {
            return Err(refused(
                f,
                &self.vm.name,
                "is already running",
                format!(
                    "cut its power first (`boma-qvm fault {0} power-cut`), or press reset (`boma-qvm fault {0} reset`)",
                    self.vm.name
                ),
            ));
        }
        let check = check::check_overlay(&self.vm).await?;
        let mut detail = "booting the same overlay again".to_string();
        if let Some(c) = &check {
            detail.push_str(&format!("; qemu-img check: {}", c.summary()));
        }
        let data = match &check {
            Some(c) => json!({"disk_check": c}),
            None => json!({}),
        };
        self.injecting(f, detail, data, self.start()).await
    }
}
