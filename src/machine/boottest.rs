//! `doctor --boot-test`: prove the accelerator on this host with one command. Boots the busybox
//! test guest ([`crate::guest::testguest`]) with no network, times QEMU start -> the guest's READY marker
//! and a clean reboot (ACPI power button -> guest shutdown -> reset -> READY again), shuts it
//! down and removes the VM. A guest that never gets READY (a hung KVM guest on a nested host)
//! times out with a fix line instead of hanging.
//!
//! The VM is `boma-it-doctor` in the user's state directory, under the same resource guard as
//! any VM, so a boot test killed with SIGKILL is reaped by `boma-qvm prune` like any leftover.

use super::accel::Accel;
use super::events::names;
use super::spec::{Boot, VmSpec};
use super::{Machine, ShutdownOutcome, StartOptions};
use crate::guest::testguest::{self, READY};
use crate::paths::Dirs;
use crate::{Error, Result};
use std::time::{Duration, Instant};

/// The boot test's VM.
pub const VM_NAME: &str = "boma-it-doctor";

/// How long a boot (QEMU start -> READY) may take: KVM 30 s; TCG five times that. Measured under
/// TCG on a busy 2-core host: 3-6 s.
pub fn default_ready_timeout(accel: Accel) -> Duration {
    accel.scale(Duration::from_secs(30))
}

#[derive(Debug, Clone)]
pub struct Options {
    pub accel: Accel,
    /// Per wait: the first READY, the guest's shutdown after the power button, READY again.
    pub timeout: Duration,
    pub start: StartOptions,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub accel: Accel,
    /// QEMU started (the supervisor's QEMU_STARTED record) -> READY on the console.
    pub ready: Duration,
    /// Power button pressed -> guest shut down -> reset -> READY again.
    pub reboot: Duration,
    /// Whether the final shutdown was clean (the guest powered off by itself).
    pub clean_shutdown: bool,
}

/// Build the guest if needed, boot it, reboot it, shut it down; remove the VM whatever happens
/// (also on Ctrl-C or SIGTERM, which end the test early with an error).
pub async fn run(dirs: &Dirs, opts: &Options) -> Result<Report> {
    let cache = dirs.cache.clone();
    let guest = tokio::task::spawn_blocking(move || testguest::ensure(&cache))
        .await
        .expect("guest build task")?;
    let mut spec = VmSpec::new(
        VM_NAME,
        opts.accel,
        Boot::Kernel {
            kernel: guest.kernel,
            initrd: Some(guest.initrd),
            append: "console=ttyS0".into(),
        },
    );
    spec.cpus = 1;
    spec.memory_mib = 256;
    let m = Machine::create(dirs, &spec).map_err(|e| match e {
        Error::AlreadyExists { what, .. } => Error::AlreadyExists {
            what,
            fix: format!(
                "another boot test runs, or one was killed: `boma-qvm down {VM_NAME}` (or `boma-qvm prune`)"
            ),
        },
        other => other,
    })?
    .with_start_options(opts.start.clone());
    let result = tokio::select! {
        r = steps(&m, opts) => r,
        sig = interrupted() => Err(Error::input(
            format!("boot test interrupted by {sig}; the test VM was removed"),
            "run `boma-qvm doctor --boot-test` again",
        )),
    };
    let name = m.name().to_string();
    let removed = m.down().await;
    match (result, removed) {
        (Ok(r), Ok(())) => Ok(r),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(Error::qemu(
            format!("the boot test passed but {name} could not be removed: {e}"),
            "`boma-qvm prune`",
        )),
    }
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT (Ctrl-C)",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// The fix for a guest that did not reach READY in time.
fn hang_fix(accel: Accel) -> String {
    match accel {
        Accel::Kvm => "the guest hangs under KVM on this host: typical of nested or PVM \
             virtualisation, where /dev/kvm opens but guests never run. Use --accel tcg (and run \
             VMs with --accel auto, which picks TCG unless the CPU advertises vmx/svm); if this \
             host should have working KVM, check the BIOS's VT-x/AMD-V setting and `dmesg | grep -i kvm`"
            .into(),
        Accel::Tcg => "under TCG the guest normally reaches READY in seconds: the host may be \
             overloaded (try again, or give it longer with --boot-timeout SECS); read the console \
             tail above for a kernel error"
            .into(),
    }
}

/// The fix for QEMU failing (dying at start or during the test). The VM's directory, and with it
/// its qemu.log, is removed afterwards, so the fix cannot point there: QEMU's own error is in the
/// problem text.
fn qemu_fix(accel: Accel) -> String {
    match accel {
        Accel::Kvm => "QEMU could not run a KVM guest on this host (typical of nested or PVM \
             virtualisation: it aborts setting MSRs, or the guest hangs). Use --accel tcg (and \
             --accel auto for VMs, which picks TCG unless the CPU advertises vmx/svm); if this host \
             should have working KVM, check the BIOS's VT-x/AMD-V setting and `dmesg | grep -i kvm`"
            .into(),
        Accel::Tcg => "read QEMU's error above; `boma-qvm doctor` lists missing tools, and \
             `make setup` installs QEMU"
            .into(),
    }
}

/// `e` with the boot test's fix: the hang fix for a timeout, the QEMU fix for QEMU dying.
fn explain(e: Error, accel: Accel) -> Error {
    match e.inner() {
        Error::Timeout { .. } => e.with_fix(hang_fix(accel)),
        // QEMU's own fix (also one nested in the supervisor's message) points at the run
        // directory, which is gone.
        Error::Qemu { problem, .. } => Error::qemu(
            problem
                .lines()
                .filter(|l| !l.trim_start().starts_with("fix:"))
                .collect::<Vec<_>>()
                .join("\n"),
            qemu_fix(accel),
        ),
        _ => e,
    }
}

async fn steps(m: &Machine, opts: &Options) -> Result<Report> {
    let explained = |e| explain(e, opts.accel);
    m.start().await.map_err(explained)?;
    let started = m
        .events()?
        .iter()
        .rev()
        .find(|r| r.is(names::QEMU_STARTED))
        .map(|r| r.ts)
        .unwrap_or_else(super::events::now);
    m.expect_console(READY, opts.timeout)
        .await
        .map_err(explained)?;
    let ready = Duration::from_secs_f64((super::events::now() - started).max(0.0));

    let t = Instant::now();
    m.reboot_within(Some(opts.timeout))
        .await
        .map_err(explained)?;
    // Evidence that the reboot was the clean one: the guest's own shutdown script ran.
    m.expect_console(testguest::SHUTDOWN, opts.timeout)
        .await
        .map_err(|e| Error::Reboot {
            problem: format!(
                "the guest rebooted without running its shutdown path (no {} on the console): {e}",
                testguest::SHUTDOWN
            ),
            fix: "report this as a bug: a clean reboot must press the ACPI power button and \
                      wait for the guest to shut down"
                .into(),
        })?;
    m.expect_console(READY, opts.timeout)
        .await
        .map_err(explained)?;
    let reboot = t.elapsed();

    let clean_shutdown = m.shutdown_within(opts.timeout).await? == ShutdownOutcome::Clean;
    Ok(Report {
        accel: opts.accel,
        ready,
        reboot,
        clean_shutdown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_scale_and_hangs_get_an_accelerator_specific_fix() {
        assert_eq!(default_ready_timeout(Accel::Kvm), Duration::from_secs(30));
        assert_eq!(default_ready_timeout(Accel::Tcg), Duration::from_secs(150));
        let e = explain(
            Error::timeout("READY", 30, "").with_evidence("console tail", ""),
            Accel::Kvm,
        );
        assert_eq!(e.exit_code(), 9);
        let msg = e.to_string();
        assert!(
            msg.contains("fix: the guest hangs under KVM") && msg.contains("--accel tcg"),
            "{msg}"
        );
        let died = explain(
            Error::qemu(
                "did not start: QEMU exited (SIGABRT)\n  fix: see qemu.log",
                "see qemu.log",
            ),
            Accel::Kvm,
        );
        assert_eq!(died.exit_code(), 7);
        let msg = died.to_string();
        assert!(
            msg.contains("QEMU exited (SIGABRT)") && msg.contains("--accel tcg"),
            "{msg}"
        );
        assert!(
            !msg.contains("qemu.log"),
            "the removed run dir is not a fix: {msg}"
        );
        let other = explain(Error::guard("low", "free some"), Accel::Tcg);
        assert_eq!(other.to_string(), "resource guard: low\n  fix: free some");
    }
}
