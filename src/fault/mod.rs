//! Fault injection: what a host survives, not only a clean reboot. Faults are methods of
//! [`Machine`], so a test reads like the scenario it checks:
//!
//! ```no_run
//! # async fn scenario(dirs: &boma_qvm::paths::Dirs, req: &boma_qvm::machine::UpRequest) -> boma_qvm::Result<()> {
//! use boma_qvm::machine::Machine;
//! use std::time::Duration;
//! let t = Duration::from_secs(120);
//! let m = Machine::up(dirs, req).await?;
//! m.expect_console("PROBE ok", t).await?;
//! m.egress(false).await?;
//! m.expect_console("PROBE fail", t).await?; // the service notices
//! m.egress(true).await?;
//! m.expect_console("PROBE ok", t).await?;
//! m.hard_reset().await?;
//! m.wait_for_event("RESET", t).await?;
//! # Ok(()) }
//! ```
//!
//! Every injected fault is written to the VM's events.jsonl (a `FAULT` record with its `kind`)
//! beside QEMU's own events, before it is injected; a fault that then fails gets a
//! `FAULT_FAILED` record. A fault the VM's state does not allow (thaw when not frozen, power-on
//! while running, link on a VM without a NIC, ...) is refused with an `Error::Input` naming the
//! state and the fix, and nothing is recorded.
//!
//! Mechanisms (see each method): power cut = SIGKILL of QEMU (no guest shutdown, QEMU's own
//! caches lost too), power on = the same overlay booted again after a `qemu-img check`; reset,
//! clean reboot, link, freeze/thaw and NMI over QMP; disk errors = `blkdebug` nodes spliced
//! under the qcow2 node and over its backing at run time (`blockdev-add` + `blockdev-reopen`);
//! egress = our nft table's no-egress set.

mod check;
mod disk;
mod inject;
mod kind;
mod power;

pub use check::{DISK_CHECK, OverlayCheck, check_overlay};
pub use disk::{BACKING_FAULT_NODE, FAULT_NODE};
pub use kind::Fault;

use crate::machine::Machine;
use crate::machine::events::{self, Record, Source, names};
use crate::{Error, Result};
use serde_json::{Value, json};
use std::time::Instant;

/// The record written when an injected fault failed after its `FAULT` record.
pub const FAULT_FAILED: &str = names::FAULT_FAILED;

impl Machine {
    /// Inject `fault` by name (what `boma-qvm fault VM <fault>` runs). Returns its record.
    pub async fn inject(&self, fault: Fault) -> Result<Record> {
        match fault {
            Fault::PowerCut => self.power_cut().await,
            Fault::PowerOn => self.power_on().await,
            Fault::Reset => self.hard_reset().await,
            Fault::Reboot => self.clean_reboot().await,
            Fault::LinkDown => self.link(false).await,
            Fault::LinkUp => self.link(true).await,
            Fault::Freeze => self.freeze().await,
            Fault::Thaw => self.thaw().await,
            Fault::DiskErrorsOn => self.disk_errors(true).await,
            Fault::DiskErrorsOff => self.disk_errors(false).await,
            Fault::EgressOff => self.egress(false).await,
            Fault::EgressOn => self.egress(true).await,
            Fault::Nmi => self.nmi().await,
        }
    }

    /// Record `fault` (with `detail`, what is about to happen, and `data`), run `act`, and
    /// record `FAULT_FAILED` if it fails. Logs the time the injection took.
    async fn injecting<T>(
        &self,
        fault: Fault,
        detail: String,
        data: Value,
        act: impl std::future::Future<Output = Result<T>>,
    ) -> Result<Record> {
        let mut data = data;
        if !data.is_object() {
            data = json!({});
        }
        data["kind"] = json!(fault.name());
        data["detail"] = json!(detail);
        let rec = Record::new(Source::Fault, names::FAULT, data);
        events::append(&self.vm.run.events(), &rec)?;
        let started = Instant::now();
        match act.await {
            Ok(_) => {
                tracing::info!(
                    "{}: {} ({detail}) in {:.1}s",
                    self.vm.name,
                    fault.name(),
                    started.elapsed().as_secs_f64()
                );
                Ok(rec)
            }
            Err(e) => {
                let failed = Record::new(
                    Source::Fault,
                    FAULT_FAILED,
                    json!({"kind": fault.name(), "error": e.to_string()}),
                );
                let _ = events::append(&self.vm.run.events(), &failed);
                Err(e)
            }
        }
    }

    /// Refuse with `Error::Input` unless QEMU runs.
    fn require_running(&self, fault: Fault) -> Result<()> {
        if self.vm.is_running() {
            return Ok(());
        }
        Err(refused(
            fault,
            &self.vm.name,
            "is not running",
            format!(
                "power it on first (`boma-qvm fault {0} power-on` or `boma-qvm start {0}`)",
                self.vm.name
            ),
        ))
    }
}

/// The refusal for a fault the VM's state does not allow.
fn refused(fault: Fault, vm: &str, state: &str, fix: impl Into<String>) -> Error {
    Error::input(format!("cannot inject {}: {vm} {state}", fault.name()), fix)
}
