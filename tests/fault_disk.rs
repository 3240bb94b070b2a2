//! Disk errors on a running VM, against real QEMU under TCG with the busybox test guest: the
//! guest's disk probe (`boma.disk=probe`, O_DIRECT write + read every second) sees EIO while
//! they are on, QEMU records BLOCK_IO_ERROR, and I/O works again when they are off.

mod common;

use boma_qvm::Error;
use common::faults::*;
use common::*;

#[tokio::test]
async fn disk_errors_surface_as_eio_and_block_io_error_and_switch_off_again() {
    let _one = one_vm_at_a_time();
    let env = Env::new();
    let vm = boot_with_disk(&env, "disk", "boma.disk=probe", 64).await;
    vm.expect_console("BOMA-TESTGUEST-DISK ok", T)
        .await
        .unwrap();

    let rec = vm.disk_errors(true).await.unwrap();
    assert_eq!(rec.data["kind"], "disk-errors-on");
    let line = vm
        .expect_console("BOMA-TESTGUEST-DISK fail", T)
        .await
        .unwrap();
    // `fail write: dd: error writing '/dev/vda': Input/output error read: dd: /dev/vda: Input/output error N`
    assert!(
        line.contains("write: dd:") && line.contains("read: dd:"),
        "both the write and the read fail: {line}"
    );
    assert_eq!(line.matches("Input/output error").count(), 2, "EIO: {line}");
    let ev = vm.wait_for_event("BLOCK_IO_ERROR", T).await.unwrap();
    assert_eq!(ev.data["node-name"], "disk0");
    assert_eq!(
        ev.data["action"], "report",
        "the guest sees the error, the VM runs on"
    );
    let ops: Vec<String> = vm
        .events()
        .unwrap()
        .iter()
        .filter(|r| r.is("BLOCK_IO_ERROR"))
        .filter_map(|r| r.data["operation"].as_str().map(str::to_string))
        .collect();
    assert!(
        ops.iter().any(|o| o == "read") && ops.iter().any(|o| o == "write"),
        "{ops:?}"
    );

    // Asking again is not an error and changes nothing.
    let again = vm.disk_errors(true).await.unwrap();
    assert!(
        again.data["detail"]
            .as_str()
            .unwrap()
            .contains("already on")
    );

    vm.disk_errors(false).await.unwrap();
    let line = vm
        .expect_console("BOMA-TESTGUEST-DISK ok", T)
        .await
        .unwrap();
    assert!(line.contains(" ok "), "{line}");
    assert!(vm.is_running());
    assert_eq!(boots(&vm), 1, "no reboot involved");

    // The log says what was injected when, beside QEMU's own events.
    let tl = timeline(&vm);
    assert_in_order(
        &tl,
        &[
            "FAULT:disk-errors-on",
            "BLOCK_IO_ERROR",
            "FAULT:disk-errors-off",
        ],
    );
    let before_on = &tl[..tl.iter().position(|e| e == "FAULT:disk-errors-on").unwrap()];
    assert!(!before_on.contains(&"BLOCK_IO_ERROR".to_string()), "{tl:?}");
}

#[tokio::test]
async fn disk_errors_need_a_disk_and_a_running_vm() {
    let _one = one_vm_at_a_time();
    let env = Env::new();
    let vm = boot(&env, "nodisk", "").await;
    let e = vm.disk_errors(true).await.unwrap_err();
    assert!(matches!(e, Error::Input { .. }), "{e}");
    assert!(e.to_string().contains("has no disk"), "{e}");
    assert!(
        !timeline(&vm).iter().any(|n| n.starts_with("FAULT")),
        "a refused fault is not recorded"
    );
    vm.power_cut().await.unwrap();
    let e = vm.disk_errors(false).await.unwrap_err();
    assert!(
        e.to_string().contains("is not running") && e.to_string().contains("fix:"),
        "{e}"
    );
}
