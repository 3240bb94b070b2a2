//! Power faults against real QEMU under TCG with the busybox test guest: a power cut in the
//! middle of disk writes, power on again, the reset button and a clean reboot through the fault
//! API, and the refusals when the VM's state does not allow a fault.

mod common;

use boma_qvm::Error;
use boma_qvm::machine::State;
use boma_qvm::machine::events::names;
use common::faults::*;
use common::*;

#[tokio::test]
async fn a_power_cut_mid_write_leaves_the_vm_bootable_with_no_guest_shutdown() {
    let _one = one_vm_at_a_time();
    let env = Env::new();
    let vm = boot_with_disk(&env, "cut", "boma.disk=write", 512).await;
    // The guest is busy writing (256 KiB chunks, each fsynced, to clusters it allocates).
    vm.expect_console("BOMA-TESTGUEST-WROTE", T).await.unwrap();
    vm.expect_console("BOMA-TESTGUEST-WROTE", T).await.unwrap();

    let e = vm.power_on().await.unwrap_err();
    assert!(
        matches!(e, Error::Input { .. }) && e.to_string().contains("already running"),
        "{e}"
    );

    vm.power_cut().await.unwrap();
    assert_eq!(vm.state(), State::Off);
    let exited = vm
        .events()
        .unwrap()
        .into_iter()
        .rfind(|r| r.is(names::QEMU_EXITED))
        .unwrap();
    assert!(
        exited.data["status"].as_str().unwrap().contains("SIGKILL"),
        "QEMU was killed, it did not quit: {exited:?}"
    );
    let e = vm.power_cut().await.unwrap_err();
    assert!(e.to_string().contains("already off"), "{e}");
    let e = vm.freeze().await.unwrap_err();
    assert!(
        e.to_string().contains("is not running") && e.to_string().contains("power-on"),
        "{e}"
    );

    vm.power_on().await.unwrap();
    vm.expect_console(READY, T).await.unwrap();
    assert_eq!(boots(&vm), 2);
    // The same overlay is in use and works: the guest writes to it again.
    vm.expect_console("BOMA-TESTGUEST-WROTE", T).await.unwrap();

    // qemu-img check ran before the boot: at worst leaked clusters, never corruption.
    let check = vm
        .events()
        .unwrap()
        .into_iter()
        .find(|r| r.is(boma_qvm::fault::DISK_CHECK))
        .expect("power_on records the overlay check");
    assert_eq!(check.data["check"]["corruptions"], 0, "{check:?}");

    // Between the cut and the next start: QEMU died, and no guest shutdown of any kind.
    let tl = timeline(&vm);
    let cut = tl.iter().position(|e| e == "FAULT:power-cut").unwrap();
    let on = tl.iter().position(|e| e == "FAULT:power-on").unwrap();
    let restarted = cut
        + tl[cut..]
            .iter()
            .position(|e| e == names::QEMU_STARTED)
            .unwrap();
    assert!(cut < on && on < restarted, "{tl:?}");
    let between = &tl[cut..restarted];
    assert!(between.contains(&names::QEMU_EXITED.to_string()), "{tl:?}");
    for shutdown in ["SHUTDOWN", "POWERDOWN", "RESET"] {
        assert!(
            !between.iter().any(|e| e == shutdown),
            "{shutdown} in {between:?}"
        );
    }
    // A wait after power_on sees the new QEMU, not the old one's exit.
    vm.hard_reset().await.unwrap();
    vm.wait_for_event("RESET", T).await.unwrap();
}

#[tokio::test]
async fn reset_and_clean_reboot_through_the_fault_api() {
    let _one = one_vm_at_a_time();
    let env = Env::new();
    let vm = boot(&env, "reset", "").await;

    let rec = vm.hard_reset().await.unwrap();
    assert_eq!(rec.data["kind"], "reset");
    let reset = vm.wait_for_event("RESET", T).await.unwrap();
    assert_eq!(reset.data["reason"], "host-qmp-system-reset");
    vm.expect_console(READY, T).await.unwrap();
    assert_eq!(boots(&vm), 2);
    assert_eq!(vm.console_count("BOMA-TESTGUEST-SHUTDOWN"), 0);

    vm.clean_reboot().await.unwrap();
    vm.wait_for_event("SHUTDOWN", T).await.unwrap();
    vm.wait_for_event("RESET", T).await.unwrap();
    vm.expect_console(READY, T).await.unwrap();
    assert_eq!(boots(&vm), 3);
    assert_eq!(vm.console_count("BOMA-TESTGUEST-SHUTDOWN"), 1);

    // A frozen guest can neither be reset nor rebooted through the fault API.
    vm.freeze().await.unwrap();
    for e in [
        vm.hard_reset().await.unwrap_err(),
        vm.clean_reboot().await.unwrap_err(),
    ] {
        assert!(
            e.to_string().contains("is frozen") && e.to_string().contains("thaw"),
            "{e}"
        );
    }
    vm.thaw().await.unwrap();
}
