//! The CLI from a shell's point of view: console attach, prune after a crash, the resource guard,
//! accelerator choice, and clear errors with distinct exit codes.

mod common;

use boma_qvm::machine::Machine;
use common::*;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn guest_args(host: &str) -> Vec<String> {
    let (k, i) = test_guest();
    let mut args = common::guest_up_args(host, &k, &i, "console=ttyS0");
    args.push("--no-net".into());
    args
}

fn up(env: &Env, host: &str) -> Output {
    env.cli().args(guest_args(host)).output().unwrap()
}

/// The VM `host`, attached with its cursors at its first boot, once its READY line is there.
async fn wait_ready(env: &Env, host: &str) -> Machine {
    let m = Machine::attach(&env.dirs, host).unwrap();
    m.rewind().await;
    m.expect_console(READY, Duration::from_secs(120))
        .await
        .unwrap();
    m
}

#[tokio::test]
async fn up_console_reboot_shutdown_down_from_the_shell() {
    let env = Env::new();
    let o = up(&env, "sh1");
    assert!(o.status.success(), "{}", text(&o));
    if !boma_qvm::machine::accel::KvmProbe::read().usable() {
        assert!(
            text(&o).contains("using TCG"),
            "auto falls back to TCG with a warning: {}",
            text(&o)
        );
    }
    let m = wait_ready(&env, "sh1").await;

    // Attach through a real pty (script), type a command whose output only the guest can produce,
    // then detach with Ctrl-].
    let mut child = Command::new("script")
        .args([
            "-qfec",
            &format!("{} console sh1", env!("CARGO_BIN_EXE_boma-qvm")),
            "/dev/null",
        ])
        .env("BOMA_QVM_STATE_DIR", &env.dirs.state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    stdin.write_all(b"echo $((6*7))-from-guest\r").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    stdin.write_all(&[0x1d]).unwrap();
    let out = child.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(seen.contains("42-from-guest"), "console output: {seen}");
    assert!(out.status.success());
    let log = env.cli().run(&["console", "sh1", "--log"]);
    assert!(
        String::from_utf8_lossy(&log.stdout).contains("42-from-guest"),
        "captured while attached"
    );

    let o = env.cli().run(&["reboot", "sh1"]);
    assert!(o.status.success(), "{}", text(&o));
    m.expect_console(READY, Duration::from_secs(120))
        .await
        .unwrap();
    let o = env.cli().run(&["reboot", "--hard", "sh1"]);
    assert!(o.status.success(), "{}", text(&o));
    m.expect_console(READY, Duration::from_secs(120))
        .await
        .unwrap();
    let o = env.cli().run(&["shutdown", "sh1"]);
    assert!(
        o.status.success() && text(&o).contains("shut down cleanly"),
        "{}",
        text(&o)
    );
    let o = env.cli().run(&["status", "sh1"]);
    assert!(text(&o).contains(" off "), "{}", text(&o));
    let o = env.cli().run(&["down", "sh1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!env.dirs.vm("boma-it-sh1").exists());
    assert!(qemus_under(&env.dirs.state).is_empty());
}

#[tokio::test]
async fn prune_reaps_a_vm_whose_cli_was_killed_mid_up() {
    let env = Env::new();
    let mut child = env
        .cli()
        .args(guest_args("crash"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run_dir = env.dirs.vm("boma-it-crash");
    let t = Instant::now();
    while !run_dir.join("supervisor.pid").exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Give the orphaned supervisor time to start QEMU, as after a real crash.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !qemus_under(&env.dirs.state).is_empty(),
        "QEMU outlived the killed CLI"
    );
    let o = env.cli().run(&["prune"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(qemus_under(&env.dirs.state).is_empty(), "no QEMU left");
    assert!(
        boma_qvm::machine::procs::find(|a| a.iter().any(|x| x == "__supervise")
            && boma_qvm::machine::procs::mentions(a, &env.dirs.state))
        .is_empty()
    );
    assert!(
        !run_dir.exists(),
        "run dir (and its sockets and overlay) gone"
    );
}

#[test]
fn the_resource_guard_refuses_with_the_numbers() {
    let env = Env::new();
    let mut args = guest_args("greedy");
    args.extend(["--min-free-mib".into(), "99999999".into()]);
    let o = env.cli().args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("MiB of RAM available") && t.contains("99999999 MiB needed"),
        "{t}"
    );
    assert!(
        !env.dirs.vm("boma-it-greedy").exists(),
        "nothing half-made is left"
    );
}

#[test]
fn kvm_is_refused_where_it_is_not_usable() {
    if boma_qvm::machine::accel::KvmProbe::read().usable() {
        eprintln!(
            "skipped: this machine has usable KVM (the refusal rule is unit-tested in accel.rs)"
        );
        return;
    }
    let env = Env::new();
    let mut args = guest_args("kvm");
    args.extend(["--accel".into(), "kvm".into()]);
    let o = env.cli().args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--force-accel"), "{}", text(&o));
}

#[tokio::test]
async fn clear_errors_with_distinct_exit_codes() {
    let env = Env::new();
    // A missing kernel.
    let o = env
        .cli()
        .run(&["up", "nok", "--kernel", "/nonexistent/vmlinuz", "--no-net"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    // An unknown VM.
    let o = env.cli().run(&["reboot", "ghost"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("boma-qvm list"));
    // No QEMU on PATH.
    let o = env
        .cli()
        .args(guest_args("noqemu"))
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("qemu-system-x86"), "{}", text(&o));

    assert!(up(&env, "one").status.success());
    wait_ready(&env, "one").await;
    // The same VM again.
    let o = up(&env, "one");
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    // One VM at a time by default.
    let o = up(&env, "two");
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("boma-it-one"),
        "names the VM holding the slot: {}",
        text(&o)
    );
    assert!(!env.dirs.vm("boma-it-two").exists());
    // A QMP monitor that does not answer (another client holds it).
    let _holder =
        std::os::unix::net::UnixStream::connect(env.dirs.vm("boma-it-one").join("ctl.sock"))
            .unwrap();
    let o = env.cli().run(&["reboot", "--hard", "one"]);
    assert_eq!(o.status.code(), Some(8), "{}", text(&o));
    assert!(text(&o).contains("did not answer"), "{}", text(&o));
    drop(_holder);
    // A stopped VM.
    assert!(env.cli().run(&["shutdown", "one"]).status.success());
    let o = env.cli().run(&["reboot", "one"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(
        text(&o).contains("not running") && text(&o).contains("boma-qvm start"),
        "{}",
        text(&o)
    );
}
