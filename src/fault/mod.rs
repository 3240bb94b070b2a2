//! Fault injection: what a host survives, not only a clean reboot. A [`Target`] wraps a VM so a
//! Rust test reads like the scenario it checks:
//!
//! ```no_run
//! # async fn scenario(dirs: &boma_qvm::paths::Dirs, req: &boma_qvm::provision::UpRequest) -> boma_qvm::Result<()> {
//! use boma_qvm::fault::Target;
//! use std::time::Duration;
//! let t = Duration::from_secs(120);
//! let vm = Target::up(dirs, req).await?;
//! vm.expect_console("PROBE ok", t).await?;
//! vm.egress(false).await?;
//! vm.expect_console("PROBE fail", t).await?; // the service notices
//! vm.egress(true).await?;
//! vm.expect_console("PROBE ok", t).await?;
//! vm.hard_reset().await?;
//! vm.wait_for_event("RESET", t).await?;
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
mod watch;

pub use check::{DISK_CHECK, OverlayCheck, check_overlay};
pub use disk::{BACKING_FAULT_NODE, FAULT_NODE};
pub use kind::Fault;

use crate::machine::events::{self, Record, Source, Tail, names};
use crate::machine::provision::{self, UpRequest};
use crate::machine::vm::{StartOptions, Vm};
use crate::paths::Dirs;
use crate::stage::Stages;
use crate::{Error, Result, guest::ssh};
use serde_json::{Value, json};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// The record written when an injected fault failed after its `FAULT` record.
pub const FAULT_FAILED: &str = "FAULT_FAILED";

/// A VM under test, with cursors into its event log and console so waits see what happened
/// after the previous wait, not before.
pub struct Target {
    pub vm: Vm,
    dirs: Dirs,
    start: StartOptions,
    events: tokio::sync::Mutex<Tail>,
    console: std::sync::Mutex<u64>,
}

impl Target {
    /// Create and boot a VM (`provision::up`: image or kernel, network, lease, SSH when asked).
    /// The cursors start at the VM's first event and console byte.
    pub async fn up(dirs: &Dirs, req: &UpRequest) -> Result<Target> {
        let p = provision::up(dirs, req, &mut Stages::new()).await?;
        let t = Target::new(dirs, p.vm, 0).with_start_options(req.start.clone());
        *t.events.lock().await = t.vm.tail_from_start();
        Ok(t)
    }

    /// Take over an existing VM; the cursors start now (only what happens from here on).
    pub fn attach(dirs: &Dirs, vm: Vm) -> Target {
        let len = watch::console_len(&vm);
        Target::new(dirs, vm, len)
    }

    fn new(dirs: &Dirs, vm: Vm, console_at: u64) -> Target {
        let tail = vm.tail();
        Target {
            dirs: dirs.clone(),
            start: StartOptions::default(),
            events: tokio::sync::Mutex::new(tail),
            console: std::sync::Mutex::new(console_at),
            vm,
        }
    }

    /// How `power_on` starts QEMU (the supervisor binary, resource guard).
    pub fn with_start_options(mut self, opts: StartOptions) -> Self {
        self.start = opts;
        self
    }

    pub fn name(&self) -> &str {
        &self.vm.name
    }

    pub fn dirs(&self) -> &Dirs {
        &self.dirs
    }

    /// The VM's address on the isolated network.
    pub fn ip(&self) -> Result<Ipv4Addr> {
        provision::vm_ip(&self.dirs, &self.vm)
    }

    fn accel_scaled(&self, kvm: Duration) -> Duration {
        self.vm
            .spec()
            .map(|s| s.accel.scale(kvm))
            .unwrap_or(kvm * 5)
    }

    /// Wait until SSH logins with the run's key work (image VMs).
    pub async fn wait_ssh(&self, timeout: Duration) -> Result<()> {
        let conn = provision::ssh_conn(&self.dirs, &self.vm)?;
        let ip = self.ip()?;
        provision::watched(&self.vm, async {
            crate::net::wait_for_ssh(ip, timeout).await?;
            ssh::wait_for_login(&conn, timeout).await
        })
        .await
    }

    /// Run `cmd` in the guest over SSH; its stdout, or `Error::Command` when it fails.
    pub async fn ssh(&self, cmd: &str, timeout: Duration) -> Result<String> {
        let conn = provision::ssh_conn(&self.dirs, &self.vm)?;
        ssh::run_ok(&conn, cmd, timeout).await
    }

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
