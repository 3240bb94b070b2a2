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

/// Reboot the VM. `timeout` bounds the guest's shutdown path (clean) or the RESET (hard).
pub async fn reboot(vm: &Vm, mode: RebootMode, timeout: Duration) -> Result<()> {
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
                |r| r.is("SHUTDOWN"),
            )
            .await;
        if let Err(e) = down {
            let _ = set_shutdown_action(&ctl, ShutdownAction::poweroff).await;
            return Err(match e {
                Error::Timeout { what, secs, .. } => Error::timeout(
                    what,
                    secs,
                    format!(
                        " (does the guest handle the ACPI power button?)\n  fix: `boma-qvm reboot --hard {}` presses reset instead\n--- console tail ---\n{}",
                        vm.name,
                        vm.console_tail(15)
                    ),
                ),
                other => other,
            });
        }
        tracing::info!(
            "{}: guest shut down after {:.1}s; resetting",
            vm.name,
            started.elapsed().as_secs_f64()
        );
    }
    ctl.run(system_reset {}).await?;
    if mode == RebootMode::Clean {
        set_shutdown_action(&ctl, ShutdownAction::poweroff).await?;
        ctl.run(cont {}).await?;
    }
    tail.wait_for("RESET", Duration::from_secs(30), |r| r.is("RESET"))
        .await?;
    tracing::info!(
        "{}: {:?} reboot done in {:.1}s",
        vm.name,
        mode,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// The guest powered off by itself after the power button.
    Clean,
    /// It did not in time; QEMU was stopped with `quit` (or SIGKILL).
    Forced,
}

/// Press the power button and wait for QEMU to exit; force it after `timeout`.
pub async fn shutdown(vm: &Vm, timeout: Duration) -> Result<ShutdownOutcome> {
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
