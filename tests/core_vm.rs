//! The core supervisor against real QEMU under TCG, with the busybox test guest.

mod common;

use boma_qvm::machine::events::names;
use boma_qvm::machine::power::{self, RebootMode, ShutdownOutcome};
use boma_qvm::machine::vm::{State, Vm};
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn boot_ids(vm: &Vm) -> Vec<String> {
    let log = String::from_utf8_lossy(&std::fs::read(vm.run.console_log()).unwrap()).into_owned();
    log.lines()
        .filter_map(|l| l.split(BOOT).nth(1))
        .map(|s| s.trim().to_string())
        .collect()
}

#[tokio::test]
async fn clean_reboot_runs_the_guest_shutdown_path_then_boots_again() {
    let env = Env::new();
    let vm = env.boot("reboot", "").await;
    power::reboot(&vm, RebootMode::Clean, T).await.unwrap();
    vm.wait_console(READY, 2, T).await.unwrap();
    assert_eq!(
        vm.console_count("BOMA-TESTGUEST-SHUTDOWN"),
        1,
        "the guest's shutdown path ran"
    );
    let ids = boot_ids(&vm);
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1], "a new boot has a new boot_id");
    let ev = event_names(&vm);
    let pos = |n: &str| {
        ev.iter()
            .position(|e| e == n)
            .unwrap_or_else(|| panic!("no {n} in {ev:?}"))
    };
    assert!(
        pos("POWERDOWN") < pos("SHUTDOWN") && pos("SHUTDOWN") < pos("RESET"),
        "{ev:?}"
    );
    assert!(vm.is_running(), "QEMU paused then resumed, it did not exit");
}

#[tokio::test]
async fn hard_reset_skips_the_shutdown_path() {
    let env = Env::new();
    let vm = env.boot("hard", "").await;
    power::reboot(&vm, RebootMode::Hard, T).await.unwrap();
    vm.wait_console(READY, 2, T).await.unwrap();
    assert_eq!(vm.console_count("BOMA-TESTGUEST-SHUTDOWN"), 0);
    let resets: Vec<_> = vm
        .events()
        .unwrap()
        .into_iter()
        .filter(|r| r.is("RESET"))
        .collect();
    assert_eq!(resets[0].data["reason"], "host-qmp-system-reset");
    assert!(!event_names(&vm).contains(&"SHUTDOWN".to_string()));
}

#[tokio::test]
async fn clean_shutdown_ends_with_qemu_gone() {
    let env = Env::new();
    let vm = env.boot("shut", "").await;
    let qemu = match vm.state() {
        State::Running { qemu, .. } => qemu,
        s => panic!("{s:?}"),
    };
    assert_eq!(
        power::shutdown(&vm, T).await.unwrap(),
        ShutdownOutcome::Clean
    );
    assert!(!boma_qvm::machine::procs::alive(qemu));
    assert_eq!(vm.state(), State::Off);
    let ev = vm.events().unwrap();
    let shutdown = ev.iter().find(|r| r.is("SHUTDOWN")).unwrap();
    assert_eq!(shutdown.data["reason"], "guest-shutdown");
    assert!(ev.last().unwrap().is(names::QEMU_EXITED));
    assert!(
        !vm.run.qmp_sock().exists() && !vm.run.ctl_sock().exists(),
        "sockets cleaned up"
    );
}

#[tokio::test]
async fn a_guest_that_ignores_the_power_button_is_stopped_after_the_timeout() {
    let env = Env::new();
    let vm = env.boot("stubborn", "boma.noacpi=1").await;
    assert_eq!(
        power::shutdown(&vm, Duration::from_secs(5)).await.unwrap(),
        ShutdownOutcome::Forced
    );
    assert_eq!(vm.state(), State::Off);
    let shutdown = vm
        .events()
        .unwrap()
        .into_iter()
        .find(|r| r.is("SHUTDOWN"))
        .unwrap();
    assert_eq!(shutdown.data["reason"], "host-qmp-quit");
}

#[tokio::test]
async fn a_guest_that_powers_itself_off_ends_up_off_not_paused() {
    let env = Env::new();
    let vm = env.boot("selfoff", "").await;
    let pty = std::fs::read_to_string(vm.run.console_pty()).unwrap();
    // QEMU notices a pty client within a second; keep the pty open until it has read the line.
    let mut tty = std::fs::OpenOptions::new()
        .write(true)
        .open(pty.trim())
        .unwrap();
    std::io::Write::write_all(&mut tty, b"poweroff\n").unwrap();
    vm.tail_from_start()
        .wait_for("QEMU to exit", T, |r| r.is(names::QEMU_EXITED))
        .await
        .unwrap();
    drop(tty);
    assert_eq!(vm.state(), State::Off);
}

#[tokio::test]
async fn a_kernel_panic_on_the_console_fails_waits_fast() {
    let env = Env::new();
    let vm = Vm::create(&env.dirs, &env.guest_spec("panic", "boma.panic=1")).unwrap();
    vm.start(&start_options()).await.unwrap();
    let started = std::time::Instant::now();
    let err = vm
        .wait_console("this never appears", 1, Duration::from_secs(300))
        .await
        .unwrap_err();
    assert!(matches!(err, boma_qvm::Error::GuestFailure { .. }), "{err}");
    assert!(err.to_string().contains("Kernel panic"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(240),
        "failed fast, not by timeout"
    );
    assert!(event_names(&vm).contains(&names::CONSOLE_FAILURE.to_string()));
}

#[tokio::test]
async fn a_power_off_vm_can_be_started_again() {
    let env = Env::new();
    let vm = env.boot("again", "").await;
    power::shutdown(&vm, T).await.unwrap();
    vm.start(&start_options()).await.unwrap();
    vm.wait_console(READY, 2, T).await.unwrap();
    assert!(vm.is_running());
}
