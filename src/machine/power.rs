//! Reboot and shutdown over QMP. Each returns only when the event that proves it happened arrived.
//!
//! - Clean reboot (what `virsh reboot` does): QEMU is told to pause instead of exiting on guest
//!   shutdown (`set-action shutdown=pause`), the ACPI power button is pressed
//!   (`system_powerdown`), the guest runs its real shutdown path; on SHUTDOWN we `system_reset`,
//!   restore `shutdown=poweroff` and `cont`: a real boot follows.
//! - Hard reset: `system_reset`, the reset button.
//! - Clean shutdown: `system_powerdown`, wait for QEMU to exit; after the timeout `quit`, then
//!   SIGKILL, and the log says so.

use crate::machine::events::names;
use crate::machine::qmp::Qmp;
use crate::machine::rundir::RunDir;
use crate::machine::vm::Vm;
use crate::{Error, Result, machine::procs};
use qapi::qmp::{ShutdownAction, cont, quit, set_action, system_powerdown, system_reset};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootMode {
    Clean,
    Hard,
}

async fn set_shutdown_action(ctl: &Qmp, action: ShutdownAction) -> Result<()> {
    ctl.run(set_action {
        shutdown: Some(action),
        panic: None,
        reboot: None,
        watchdog: None,
    })
    .await?;
    Ok(())
}

/// How long the halves of a reboot took (the boot half only up to the RESET here).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Halves {
    /// Power button -> SHUTDOWN (0 for a hard reset).
    pub shutdown_secs: f64,
    /// `system_reset` -> RESET.
    pub reset_secs: f64,
}

/// Reboot the VM: the mechanism, over QMP. `timeout` bounds the guest's shutdown path (clean)
/// or the RESET (hard). `Machine::reboot` is the proven reboot built on it.
pub(crate) async fn reboot(vm: &Vm, mode: RebootMode, timeout: Duration) -> Result<Halves> {
    let ctl = vm.ctl().await?;
    let mut tail = vm.tail();
    let started = Instant::now();
    if mode == RebootMode::Clean {
        set_shutdown_action(&ctl, ShutdownAction::pause).await?;
        ctl.run(system_powerdown {}).await?;
        let down = tail
            .wait_for(
                "the guest to shut down after the ACPI power button",
                timeout,
                |r| r.is(names::SHUTDOWN),
            )
            .await;
        if let Err(e) = down {
            let _ = set_shutdown_action(&ctl, ShutdownAction::poweroff).await;
            return Err(match e {
                Error::Timeout { what, secs, .. } => vm.explain(Error::Reboot {
                    problem: format!(
                        "timed out after {secs}s waiting for {what} (does the guest handle the ACPI power button?)"
                    ),
                    fix: format!(
                        "`boma-qvm reboot --hard {}` presses reset instead",
                        vm.name
                    ),
                }),
                other => vm.explain(other),
            });
        }
        tracing::info!(
            "{}: guest shut down after {:.1}s; resetting",
            vm.name,
            started.elapsed().as_secs_f64()
        );
    }
    let shutdown_secs = if mode == RebootMode::Clean {
        started.elapsed().as_secs_f64()
    } else {
        0.0
    };
    let reset = Instant::now();
    ctl.run(system_reset {}).await?;
    if mode == RebootMode::Clean {
        set_shutdown_action(&ctl, ShutdownAction::poweroff).await?;
        ctl.run(cont {}).await?;
    }
    tail.wait_for(names::RESET, Duration::from_secs(30), |r| {
        r.is(names::RESET)
    })
    .await?;
    tracing::info!(
        "{}: {:?} reboot: reset after {:.1}s",
        vm.name,
        mode,
        started.elapsed().as_secs_f64()
    );
    Ok(Halves {
        shutdown_secs,
        reset_secs: reset.elapsed().as_secs_f64(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// The guest powered off by itself after the power button.
    Clean,
    /// It did not in time; QEMU was stopped with `quit` (or SIGKILL).
    Forced,
}

/// Press the power button and wait for QEMU to exit; force it after `timeout`.
pub(crate) async fn shutdown(vm: &Vm, timeout: Duration) -> Result<ShutdownOutcome> {
    let ctl = vm.ctl().await?;
    let mut tail = vm.tail();
    let qemu_pid = RunDir::read_pid(&vm.run.qemu_pid());
    ctl.run(system_powerdown {}).await?;
    match tail
        .wait_for("QEMU to exit after the power button", timeout, |r| {
            r.is(names::QEMU_EXITED)
        })
        .await
    {
        Ok(_) => return Ok(ShutdownOutcome::Clean),
        Err(Error::Timeout { .. }) => {}
        Err(e) => return Err(e),
    }
    tracing::warn!(
        "{}: the guest did not power off within {}s; stopping QEMU with `quit`",
        vm.name,
        timeout.as_secs()
    );
    let _ = ctl.run(quit {}).await;
    drop(ctl);
    let quit_done = tail
        .wait_for("QEMU to quit", Duration::from_secs(10), |r| {
            r.is(names::QEMU_EXITED)
        })
        .await;
    if quit_done.is_err()
        && let Some(pid) = qemu_pid
    {
        tracing::warn!(
            "{}: QEMU did not quit; sending SIGKILL to pid {pid}",
            vm.name
        );
        procs::signal(pid, nix::sys::signal::Signal::SIGKILL);
        tail.wait_for("QEMU to die", Duration::from_secs(10), |r| {
            r.is(names::QEMU_EXITED)
        })
        .await?;
    }
    Ok(ShutdownOutcome::Forced)
}
