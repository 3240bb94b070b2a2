//! Saving a running VM's memory and device state to a file and starting another VM from it (the
//! mechanism of warm starts), with the busybox test guest: seconds per test, no golden image.

mod common;

use boma_qvm::machine::events::names;
use boma_qvm::machine::{Machine, State};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);
/// Printed by the guest kernel when its VM generation ID changes (Linux's vmgenid driver).
const REFORKED: &str = "crng reseeded due to virtual machine fork";

#[tokio::test]
async fn a_saved_guest_runs_on_in_a_new_vm_with_a_reseeded_rng_and_reboots_for_real() {
    let env = Env::new();
    let a = env.boot("warm-a", "boma.tick=1").await;
    a.expect_console("BOMA-TESTGUEST-TICK", T).await.unwrap();
    let state = env.tmp.path().join("a.state");
    let saved = a.save_state(&state).await.unwrap();
    assert!(saved.bytes > 1 << 20 && saved.bytes == std::fs::metadata(&state).unwrap().len());
    assert!(
        event_names(&a).contains(&names::STATE_SAVED.to_string()),
        "{:?}",
        event_names(&a)
    );
    a.down().await.unwrap();

    // Another VM of the same machine: it does not boot, it runs on from the saved instant.
    let b = Machine::create(&env.dirs, &env.guest_spec("warm-b", "boma.tick=1"))
        .unwrap()
        .with_start_options(start_options());
    b.start_restoring(&state).await.unwrap();
    b.expect_console(REFORKED, T).await.unwrap();
    b.expect_console("BOMA-TESTGUEST-TICK", T).await.unwrap();
    assert_eq!(
        b.console_count(BOOT),
        0,
        "a restored guest runs on, it does not boot:\n{}",
        b.console_tail(20)
    );
    let ev = event_names(&b);
    let at = |n: &str| ev.iter().position(|e| e == n);
    assert!(
        at(names::RESTORED).is_some() && at(names::RESTORED) < at(names::QEMU_STARTED),
        "{ev:?}"
    );
    assert!(
        !b.run_dir().join("restore-from").exists(),
        "the restore request is one-shot"
    );

    // Its power path is a real one: a clean reboot boots the kernel.
    b.reboot().await.unwrap();
    b.expect_console(READY, T).await.unwrap();
    assert_eq!(b.console_count(BOOT), 1, "{}", b.console_tail(20));
    b.down().await.unwrap();
}

#[tokio::test]
async fn a_state_restores_only_into_the_same_machine_and_a_refusal_leaves_nothing_running() {
    let env = Env::new();
    let a = env.boot("warm-c", "").await;
    let state = env.tmp.path().join("c.state");
    a.save_state(&state).await.unwrap();
    a.down().await.unwrap();

    let mut spec = env.guest_spec("warm-d", "");
    spec.memory_mib = 384;
    let d = Machine::create(&env.dirs, &spec)
        .unwrap()
        .with_start_options(start_options());
    let e = d.start_restoring(&state).await.unwrap_err();
    assert_eq!(e.exit_code(), 7, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("did not start") && text.contains("restoring the saved state"),
        "the error says what failed: {text}"
    );
    assert_eq!(d.state(), State::Off);
    assert!(qemus_under(d.run_dir()).is_empty(), "QEMU left running");

    // A missing state file is refused before anything starts.
    let e = d
        .start_restoring(&env.tmp.path().join("nope.state"))
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), 4, "{e}");
    d.down().await.unwrap();
}

/// A warm VM's disk is a chain: its overlay on the template's disk on the golden image. QEMU
/// runs as another account (root starts it as boma-qvm-qemu) that can reach neither image here
/// (they are in a 0700 directory of root's), so it starts only if every layer is handed over.
/// Seen failing with only the first layer handed (QEMU then opens the golden image by the
/// path in the template's header: permission denied).
#[tokio::test]
async fn every_layer_of_a_two_deep_backing_chain_is_handed_to_qemu() {
    let env = Env::new();
    // Private to root (0700), apart from the state dir (whose run dirs QEMU's account enters).
    let images = tempfile::tempdir().unwrap();
    std::fs::set_permissions(images.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let (golden, template) = (
        images.path().join("golden.qcow2"),
        images.path().join("template.qcow2"),
    );
    let qemu_img = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    };
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        golden.to_str().unwrap(),
        "64M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        golden.to_str().unwrap(),
        template.to_str().unwrap(),
    ]);
    let name = "boma-it-chain";
    let overlay = env.dirs.vm(name).join("disk.qcow2");
    let mut spec = env.guest_spec("chain", "");
    spec.disk = Some(overlay.clone());
    let m = Machine::create(&env.dirs, &spec)
        .unwrap()
        .with_start_options(start_options());
    boma_qvm::guest::image::overlay::create(&template, &overlay, None).unwrap();
    m.start().await.unwrap();
    m.expect_console(READY, T).await.unwrap();
    let started = m
        .events()
        .unwrap()
        .into_iter()
        .find(|r| r.event == names::QEMU_STARTED)
        .expect("QEMU_STARTED");
    let argv: Vec<String> = serde_json::from_value(started.data["argv"].clone()).unwrap();
    let argv = argv.join(" ");
    assert!(
        argv.contains(",set=1 ") && argv.contains(",set=2 "),
        "both backing files are handed: {argv}"
    );
    assert!(!argv.contains(images.path().to_str().unwrap()), "{argv}");
    if nix::unistd::Uid::effective().is_root() {
        assert_ne!(started.data["user"], "root", "QEMU never runs as root");
    }
    m.down().await.unwrap();
}
