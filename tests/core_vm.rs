//! The core supervisor against real QEMU under TCG, with the busybox test guest.

mod common;

use boma_qvm::machine::events::names;
use boma_qvm::machine::{Machine, ShutdownOutcome, State};
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn boot_ids(m: &Machine) -> Vec<String> {
    let log = String::from_utf8_lossy(&std::fs::read(m.console_log()).unwrap()).into_owned();
    log.lines()
        .filter_map(|l| l.split(BOOT).nth(1))
        .map(|s| s.trim().to_string())
        .collect()
}

#[tokio::test]
async fn clean_reboot_runs_the_guest_shutdown_path_then_boots_again() {
    let env = Env::new();
    let m = env.boot("reboot", "").await;
    let r = m.reboot().await.unwrap();
    m.expect_console("BOMA-TESTGUEST-SHUTDOWN", T)
        .await
        .unwrap();
    m.expect_console(READY, T).await.unwrap();

    assert!(r.shutdown_secs > 0.0, "{r:?}");
    let ids = boot_ids(&m);
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1], "a new boot has a new boot_id");
    let ev = event_names(&m);
    let pos = |n: &str| {
        ev.iter()
            .position(|e| e == n)
            .unwrap_or_else(|| panic!("no {n} in {ev:?}"))
    };
    assert!(
        pos(names::POWERDOWN) < pos(names::SHUTDOWN) && pos(names::SHUTDOWN) < pos(names::RESET),
        "{ev:?}"
    );
    assert!(m.is_running(), "QEMU paused then resumed, it did not exit");
}

/// Tests run as root: QEMU must not. The supervisor drops it to the dedicated account, in its
/// seccomp sandbox, with its run directory the only place it can write, and the kernel handed
/// over as an fd (the test guest lives in root's cache, which the account cannot enter).
#[tokio::test]
async fn root_never_runs_qemu_the_account_does_in_its_sandbox() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let m = env.boot("drop", "").await;
    let State::Running { qemu, supervisor } = m.state() else {
        panic!("not running")
    };
    let acct =
        boma_qvm::machine::qemu::account::lookup(boma_qvm::machine::qemu::account::DEFAULT_ACCOUNT)
            .unwrap();
    let procs = boma_qvm::machine::procs::uid;
    assert_eq!(procs(supervisor), Some(0), "the test started it as root");
    assert_eq!(
        procs(qemu),
        Some(acct.uid.as_raw()),
        "QEMU runs as the dedicated account"
    );
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert!(field("Gid:").starts_with(&acct.gid.to_string()), "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "no capabilities");
    assert_eq!(field("Seccomp:"), "2", "QEMU's seccomp filter is on");
    let argv = boma_qvm::machine::procs::cmdline(qemu);
    let at = argv.iter().position(|a| a == "-sandbox").expect("-sandbox");
    assert_eq!(
        argv[at + 1],
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    );
    assert!(
        argv.iter().any(|a| a.starts_with("/proc/self/fd/"))
            && !argv.iter().any(|a| a.contains("/root/")),
        "the kernel is handed over, not named: {argv:?}"
    );
    let run = m.run_dir();
    let meta = std::fs::metadata(run).unwrap();
    assert_eq!(
        meta.mode() & 0o7777,
        0o1770,
        "sticky, group-writable run dir"
    );
    assert_eq!(meta.gid(), acct.gid.as_raw());
    let spec = std::fs::metadata(run.join("spec.json")).unwrap();
    assert_eq!(spec.uid(), 0, "root's files stay root's");
    let out = env.cli().ok(&["status", "drop"]);
    assert!(out.contains("qemu-user=boma-qvm-qemu"), "{out}");
    m.down().await.unwrap();
}

#[tokio::test]
async fn hard_reset_skips_the_shutdown_path() {
    let env = Env::new();
    let m = env.boot("hard", "").await;
    m.hard_reset().await.unwrap();
    m.expect_console(READY, T).await.unwrap();

    assert_eq!(m.console_count("BOMA-TESTGUEST-SHUTDOWN"), 0);
    let reset = m.wait_for_event(names::RESET, T).await.unwrap();
    assert_eq!(reset.data["reason"], "host-qmp-system-reset");
    assert!(!event_names(&m).contains(&names::SHUTDOWN.to_string()));
}

#[tokio::test]
async fn clean_shutdown_ends_with_qemu_gone() {
    let env = Env::new();
    let m = env.boot("shut", "").await;
    // Its run directory (SSH key, QMP sockets, console) is this user's only, and, since root
    // started it, QEMU's account's (its own group, sticky): never other users'.
    let meta = std::fs::metadata(m.run_dir()).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    assert_eq!(mode & 0o7777, 0o1770, "run dir mode {mode:o}");
    let acct =
        boma_qvm::machine::qemu::account::lookup(boma_qvm::machine::qemu::account::DEFAULT_ACCOUNT)
            .unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&meta),
        acct.gid.as_raw(),
        "the group is the account's own"
    );
    let group = nix::unistd::Group::from_gid(acct.gid).unwrap().unwrap();
    assert!(group.mem.is_empty(), "nobody else is in {}", group.name);
    let State::Running { qemu, .. } = m.state() else {
        panic!("{:?}", m.state())
    };
    assert_eq!(m.shutdown().await.unwrap(), ShutdownOutcome::Clean);

    assert!(!boma_qvm::machine::procs::alive(qemu));
    assert_eq!(m.state(), State::Off);
    let shutdown = m.wait_for_event(names::SHUTDOWN, T).await.unwrap();
    assert_eq!(shutdown.data["reason"], "guest-shutdown");
    assert!(m.events().unwrap().last().unwrap().is(names::QEMU_EXITED));
    for sock in ["qmp.sock", "ctl.sock"] {
        assert!(!m.run_dir().join(sock).exists(), "{sock} cleaned up");
    }
}

#[tokio::test]
async fn a_guest_that_ignores_the_power_button_is_stopped_after_the_timeout() {
    let env = Env::new();
    let m = env.boot("stubborn", "boma.noacpi=1").await;
    let e = m
        .reboot_within(Some(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), 15, "a reboot that did not happen: {e}");
    assert!(e.to_string().contains("reboot --hard"), "{e}");
    assert!(
        m.is_running(),
        "a refused power button leaves the VM running"
    );
    assert_eq!(
        m.shutdown_within(Duration::from_secs(5)).await.unwrap(),
        ShutdownOutcome::Forced
    );

    assert_eq!(m.state(), State::Off);
    let shutdown = m.wait_for_event(names::SHUTDOWN, T).await.unwrap();
    assert_eq!(shutdown.data["reason"], "host-qmp-quit");
}

#[tokio::test]
async fn a_guest_that_powers_itself_off_ends_up_off_not_paused() {
    let env = Env::new();
    let m = env.boot("selfoff", "").await;
    // QEMU notices a pty client within a second; keep the pty open until it has read the line.
    let mut tty = std::fs::OpenOptions::new()
        .write(true)
        .open(m.console_pty().unwrap())
        .unwrap();
    std::io::Write::write_all(&mut tty, b"poweroff\n").unwrap();
    m.wait_for_event(names::QEMU_EXITED, T).await.unwrap();
    drop(tty);
    assert_eq!(m.state(), State::Off);
}

#[tokio::test]
async fn a_kernel_panic_on_the_console_fails_waits_fast() {
    let env = Env::new();
    let m = Machine::create(&env.dirs, &env.guest_spec("panic", "boma.panic=1"))
        .unwrap()
        .with_start_options(start_options());
    m.start().await.unwrap();
    let started = std::time::Instant::now();
    let err = m
        .expect_console("this never appears", Duration::from_secs(300))
        .await
        .unwrap_err();

    assert!(
        matches!(err.inner(), boma_qvm::Error::GuestFailure { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Kernel panic"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(240),
        "failed fast, not by timeout"
    );
    // The wait may have ended on QEMU's GUEST_PANICKED first; the console watcher still records
    // what the console said.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !event_names(&m).contains(&names::CONSOLE_FAILURE.to_string()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no CONSOLE_FAILURE: {:?}",
            event_names(&m)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pvpanic device and `-action panic=pause`: the panic is a QMP event, and the guest stays as
/// it panicked. `panic=1` on the kernel command line would make the guest reset itself a second
/// later (QEMU's default panic action would end the VM): neither may happen.
#[tokio::test]
async fn a_guest_kernel_panic_is_a_guest_panicked_event_and_the_vm_stays_paused() {
    let env = Env::new();
    let m = Machine::create(
        &env.dirs,
        &env.guest_spec("pvpanic", "boma.panic=1 panic=1"),
    )
    .unwrap()
    .with_start_options(start_options());
    m.start().await.unwrap();
    // Read events.jsonl directly: a wait would (rightly) fail fast on the panic.
    let deadline = std::time::Instant::now() + T;
    let panicked = loop {
        if let Some(r) = m
            .events()
            .unwrap()
            .into_iter()
            .find(|r| r.is(names::GUEST_PANICKED))
        {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no GUEST_PANICKED: {:?}",
            event_names(&m)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(panicked.data["action"], "pause", "{:?}", panicked.data);
    // Longer than the guest's own panic=1 reboot delay.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(m.qemu_state().await.unwrap(), "guest-panicked");
    let ev = event_names(&m);
    let at = ev.iter().position(|e| e == names::GUEST_PANICKED).unwrap();
    assert!(
        !ev[at..]
            .iter()
            .any(|e| e == "RESET" || e == names::QEMU_EXITED),
        "the panicked guest was reset or ended: {ev:?}"
    );
    assert_eq!(m.console_count("Kernel panic - not syncing"), 1);
}

#[tokio::test]
async fn a_power_off_vm_can_be_started_again() {
    let env = Env::new();
    let m = env.boot("again", "").await;
    m.shutdown().await.unwrap();
    m.start().await.unwrap();
    m.expect_console(READY, T).await.unwrap();
    assert!(m.is_running());
}

/// What a kept VM's run directory and a failed cycle's post-mortem hold, with a secret the guest
/// printed (here: on its kernel command line, which the kernel echoes on the console and QEMU's
/// argv carries into events.jsonl and spec.json): the post-mortem's copies are scrubbed as they
/// are written, the VM's own files masked in place (same length), and the VM keeps running and
/// logging afterwards.
#[tokio::test]
async fn a_secret_the_guest_printed_is_in_no_file_of_the_vm_or_the_post_mortem() {
    use boma_qvm::cycle::{diagnostics, kept};
    use boma_qvm::secrets::Scrubber;
    let env = Env::new();
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!("bqsecret{n:x}");
    let m = env.boot("scrub", &format!("boma.note={secret}")).await;
    let holds = |p: &std::path::Path| {
        std::fs::read(p)
            .unwrap()
            .windows(secret.len())
            .any(|w| w == secret.as_bytes())
    };
    assert!(holds(&m.console_log()), "the guest did not print it");
    let sc = Scrubber::new([&secret]);
    let out = env.tmp.path().join("run");
    let written = diagnostics::copy_console_and_events(&m, &out, &sc).unwrap();
    assert_eq!(written, ["console.log", "events.jsonl", "console-tail.txt"]);
    let console_len = std::fs::metadata(m.console_log()).unwrap().len();
    kept::mask_vm_files(&m, &sc);
    assert_eq!(
        std::fs::metadata(m.console_log()).unwrap().len(),
        console_len,
        "masked in place, same length"
    );
    let mut files = Vec::new();
    for dir in [out.clone(), m.run_dir().to_path_buf()] {
        for e in std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap()) {
            if e.file_type().unwrap().is_file() {
                files.push(e.path());
            }
        }
    }
    let held: Vec<_> = files.iter().filter(|f| holds(f)).collect();
    assert!(held.is_empty(), "still hold the secret: {held:?}");
    assert!(files.len() >= 8, "{files:?}");
    let copy = std::fs::read_to_string(out.join("console.log")).unwrap();
    assert!(copy.contains("boma.note=********"), "{copy}");
    // The log QEMU writes is still the one it appends to: the guest's shutdown lands in it.
    assert_eq!(m.shutdown().await.unwrap(), ShutdownOutcome::Clean);
    let log = String::from_utf8_lossy(&std::fs::read(m.console_log()).unwrap()).into_owned();
    assert!(log.contains(boma_qvm::guest::testguest::SHUTDOWN), "{log}");
}
