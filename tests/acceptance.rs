//! The design's self-validating acceptance test, through the README's main job
//! (`make test-integration HOST=askari`) on the bundled example repo, on a real Debian 13 guest
//! under TCG, inside a network namespace this test creates, in a clean environment (`env -i`:
//! the system PATH, HOME and the test's BOMA_QVM_* dirs, as a new user's shell after
//! `.ci/setup`):
//!
//! 1. fix off: the apply succeeds and the published port answers before the reboot, and verify
//!    FAILS after the reboot on the published port — the VM kept, the post-mortem written. If
//!    this passed, the harness would not be faithful.
//! 2. fix on (`FIX=1`): the same cycle passes across the reboot and leaves nothing behind.
//!
//! Both cycles start warm (the default): restored from the golden image's template, which the
//! first Debian test to need it builds with a cold boot. So the verdicts here are the warm
//! path's; the reboot in between is a real cold one. Another test runs the red cycle booted
//! from scratch (`COLD=1`): the same verdict for the same reason.
//!
//! Both say what the reboot changed: the red diff names Docker's DNAT back under `inet filter`'s
//! forward `policy drop`; the green one shows the fix's forward accept instead. A third test (one
//! more Debian cycle) locks SSH out at boot and gets the lockout called fast, with the state
//! after the reboot read without SSH.
//!
//! The red cycle also carries two marker secrets: a secret var (`SECRET_VARS=secret_probe_marker`)
//! and the cert credential (`GANDI_API_KEY`, read by the fixture's repo from the environment).
//! The fixture's `secret_probe` role prints both in the apply, on the guest's console and into
//! its journal at every boot; no file of the run directory or of the VM's run directory (its
//! disk images aside: the guest's own) may hold either, nor may the terminal output.

mod common;

use boma_qvm::cycle::drift::{GuestState, Part, Source};
use boma_qvm::cycle::report::{Report, Verdict};
use boma_qvm::error::FailureClass;
use boma_qvm::guest::image::{self, ImageChoice};
use boma_qvm::machine::Machine;
use boma_qvm::machine::events::names;
use boma_qvm::stage::StageRecord;
use common::Env;
use common::netns::Netns;
use std::path::{Path, PathBuf};

/// A clean environment, as a new user's shell has after `.ci/setup`: `env -i` with the system
/// PATH, HOME and only the BOMA_QVM_* dirs this test needs. Nothing from the test process (a
/// venv on PATH, cargo's variables) leaks in, so boma-qvm must find Ansible the way it would
/// for them: through BOMA_QVM_ANSIBLE_DIR in /etc/boma-qvm/config.env. A missing install step
/// fails here.
fn clean_env(env: &Env, runs: &Path) -> String {
    format!(
        "env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME={} \
         BOMA_QVM_STATE_DIR={} BOMA_QVM_CACHE_DIR={} BOMA_QVM_RUNS_DIR={}",
        std::env::var("HOME").expect("HOME"),
        env.dirs.state.display(),
        env.dirs.cache.display(),
        runs.display(),
    )
}

/// The marker secrets, new for each run: (the secret var's value, the cert credential).
fn markers() -> &'static (String, String) {
    static M: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        (format!("bqvar{n:x}"), format!("bqkey{n:x}"))
    })
}

/// The markers, exported as an operator would (never on the command line).
fn secret_env() -> String {
    let (var, key) = markers();
    format!("secret_probe_marker={var} GANDI_API_KEY={key}")
}

/// A test environment with the golden image in its cache, and a network namespace of its own
/// named after `tag`. The image is built (on a fresh machine) from this process's own network:
/// the test's namespace has no route to the Debian mirror, by design.
fn with_golden_image(tag: &str) -> (Env, Netns) {
    let env = Env::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(image::ensure(&env.dirs, &ImageChoice::default()))
        .expect("golden image");
    (env, Netns::new(tag))
}

/// The README's main job, `make test-integration HOST=askari`, in a clean environment (plus
/// `extra_env`).
fn make(ns: &Netns, env: &Env, runs: &Path, extra_env: &str, knobs: &str) -> std::process::Output {
    ns.exec(&format!(
        "cd {} && {} {extra_env} make -s test-integration HOST=askari BOMA_QVM={} {knobs}",
        env!("CARGO_MANIFEST_DIR"),
        clean_env(env, runs),
        env!("CARGO_BIN_EXE_boma-qvm"),
    ))
}

/// The CLI in the test's namespace and the README's clean environment (`env -i`, plus
/// `extra_env`).
fn cli(ns: &Netns, env: &Env, runs: &Path, extra_env: &str, args: &str) -> std::process::Output {
    ns.exec(&format!(
        "{} {extra_env} {} {args}",
        clean_env(env, runs),
        env!("CARGO_BIN_EXE_boma-qvm")
    ))
}

/// Every regular file under `dir`, never following a symlink (the transient inventory links
/// into the repo), except the VM's qcow2 disk: the guest's own disk holds what it was given.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()) {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files_under(&e.path()));
        } else if t.is_file() && e.path().extension().is_none_or(|x| x != "qcow2") {
            out.push(e.path());
        }
    }
    out
}

/// No file under `dirs`, and not `output`, holds either marker.
#[track_caller]
fn assert_no_secret(dirs: &[&Path], output: &str) {
    let (var, key) = markers();
    let mut held = Vec::new();
    let mut count = 0;
    for dir in dirs {
        for f in files_under(dir) {
            count += 1;
            let bytes = std::fs::read(&f).unwrap();
            for m in [var, key] {
                if bytes.windows(m.len()).any(|w| w == m.as_bytes()) {
                    held.push(format!("{} holds {m}", f.display()));
                }
            }
        }
    }
    for m in [var, key] {
        if output.contains(m.as_str()) {
            held.push(format!("the terminal output holds {m}"));
        }
    }
    assert!(count > 20, "only {count} files checked: {dirs:?}");
    assert!(held.is_empty(), "secrets written:\n{}", held.join("\n"));
}

fn only_run_dir(runs: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

fn read_report(run: &Path) -> Report {
    let text = std::fs::read_to_string(run.join("report.json")).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("report.json: {e}\n{text}"))
}

/// The cycle's closing summary (from `== boma-qvm cycle`), shown in the test's output: what a
/// CI log of the main job looks like.
fn show_summary(what: &str, text: &str) {
    let from = text.find("== boma-qvm cycle").unwrap_or(0);
    eprintln!("---- {what} ----\n{}", &text[from..]);
}

fn read_state(run: &Path, slug: &str) -> GuestState {
    let p = run.join(format!("state-{slug}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", p.display()))
}

fn stage<'a>(report: &'a Report, name: &str) -> &'a StageRecord {
    report
        .stages
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no stage {name}: {report:#?}"))
}

#[test]
fn the_incident_reproduces_red_then_the_fix_is_green() {
    let (env, ns) = with_golden_image("acc");

    // 1. Red: today's base role, no container-forward drop-in.
    let red_runs = env.tmp.path().join("runs-red");
    let out = make(
        &ns,
        &env,
        &red_runs,
        &secret_env(),
        "SNAPSHOT=1 SECRET_VARS=secret_probe_marker",
    );
    let text = common::text(&out);
    show_summary("red", &text);
    assert_eq!(
        out.status.code(),
        Some(2),
        "make reports the failed recipe; the broken state must fail verify after the reboot:\n{text}"
    );
    assert!(
        text.contains("Error 14"),
        "boma-qvm exits 14 (verify failed):\n{text}"
    );
    assert!(
        text.contains("FAIL (test failure, exit 14)"),
        "the summary names the class:\n{text}"
    );
    let run = only_run_dir(&red_runs);
    let report = read_report(&run);
    assert_eq!(report.verdict, Verdict::Fail);
    assert_eq!(report.class, Some(FailureClass::Test), "{report:#?}");
    assert_eq!(report.exit_code, 14);
    assert!(
        report.versions.image.starts_with("debian-13-built"),
        "{report:#?}"
    );
    assert_eq!(report.image.name, "debian-13-built");
    assert!(report.image.reason.contains("default"), "{report:#?}");
    assert!(
        report.image.start.starts_with("warm: restored from "),
        "the cycle started warm: {report:#?}"
    );
    assert!(stage(&report, "re-identify").ok);
    let kvm = boma_qvm::machine::accel::KvmProbe::read().usable();
    assert_eq!(report.accel, if kvm { "kvm" } else { "tcg" });
    assert!(
        stage(&report, "apply").ok,
        "the apply itself succeeds, as on the real host"
    );
    assert!(
        stage(&report, "verify before reboot").ok,
        "green right after the apply (docker-proxy masks it)"
    );
    assert!(stage(&report, "reboot").ok, "a real reboot happened");
    let after = stage(&report, "verify after reboot");
    let why = after.error.clone().unwrap_or_default();
    assert!(
        !after.ok
            && why.contains("1 check(s) failed")
            && why.contains("published port 8080")
            && why.contains("is dead from the host side"),
        "exactly one check fails, and it is the published port (a Docker that failed to start \
         would fail more checks): {why}"
    );
    // What the reboot changed: Docker's DNAT came back under inet filter's forward drop.
    for name in [
        "state before reboot",
        "state after reboot",
        "what the reboot changed",
    ] {
        assert!(stage(&report, name).ok, "{name}: {report:#?}");
    }
    let diff = report
        .reboot_diff
        .clone()
        .expect("report.json has the reboot's diff");
    assert_eq!(diff.boot_changed, Some(true), "{diff:#?}");
    let f = diff.finding("dnat-forward-drop").unwrap_or_else(|| {
        panic!(
            "the red diff names the change that killed the port:\n{}",
            diff.render(200)
        )
    });
    assert!(
        f.breaks
            && f.text.contains("DNAT of tcp/8080")
            && f.text.contains("came back")
            && f.text.contains("`inet filter`"),
        "{}",
        f.text
    );
    assert!(diff.finding("dnat-forward-accepted").is_none());
    let nft = diff.sections.iter().find(|s| s.part == Part::Nft).unwrap();
    assert!(
        nft.added
            .iter()
            .any(|l| l.starts_with("ip nat chain DOCKER: ")
                && l.contains("dport 8080")
                && l.contains("dnat to")),
        "Docker's DNAT rule is among the added lines: {nft:#?}"
    );
    assert!(
        text.contains("!! DNAT of tcp/8080"),
        "the summary shows the diff:\n{text}"
    );
    for (slug, source) in [
        ("before-reboot", Source::Ssh),
        ("after-reboot", Source::Ssh),
    ] {
        let st = read_state(&run, slug);
        assert!(
            st.sections.iter().all(|s| s.source == source),
            "{slug}: {st:#?}"
        );
    }
    let junit = std::fs::read_to_string(run.join("junit.xml")).unwrap();
    assert!(
        junit.contains("<failure type=\"test failure\"")
            && junit.contains("<system-out>what changed from before reboot to after reboot")
            && junit.contains("DNAT of tcp/8080"),
        "{junit}"
    );
    assert!(report.vm_kept);
    for f in [
        "state-before-reboot.json",
        "state-before-reboot.txt",
        "state-after-reboot.json",
        "state-after-reboot.txt",
        "reboot-diff.txt",
        "console.log",
        "events.jsonl",
        "apply.log",
        "verify-after-reboot.log",
        "nft-ruleset.txt",
        "docker-ps.txt",
        "ss-tlnp.txt",
        "journal.txt",
        "critical-chain.txt",
        "INSPECT.txt",
        "junit.xml",
    ] {
        assert!(run.join(f).exists(), "post-mortem has {f}");
    }
    let ruleset = std::fs::read_to_string(run.join("nft-ruleset.txt")).unwrap();
    assert!(
        ruleset.contains("policy drop"),
        "the ruleset that ate the traffic is in the post-mortem:\n{ruleset}"
    );
    assert!(
        env.dirs.vm("boma-it-askari").exists(),
        "the failed VM is kept"
    );

    // The secrets reached the guest and came back in its output (so the check below is not
    // vacuous), and were scrubbed from every file of the run and of the VM.
    let read = |f: &str| String::from_utf8_lossy(&std::fs::read(run.join(f)).unwrap()).into_owned();
    assert!(
        read("apply.log").contains("secret marker: ******** credential: ********"),
        "{}",
        read("apply.log")
    );
    assert!(
        read("journal.txt").contains("secret marker: ******** credential: ********"),
        "the unit printed them into the journal after the reboot"
    );
    assert!(
        read("console.log").contains("secret marker: ******** credential: ********"),
        "the unit printed them on the console"
    );
    assert_eq!(report.secret_vars, ["secret_probe_marker"]);
    let vm_dir = env.dirs.vm("boma-it-askari");
    assert_no_secret(&[&run, &vm_dir], &text);

    // `boma-qvm diff` on the kept VM: its state now against the post-apply one.
    let o = cli(&ns, &env, &red_runs, &secret_env(), "diff askari");
    let text = common::text(&o);
    eprintln!("---- boma-qvm diff askari ----\n{text}");
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("what changed from before reboot to now")
            && text.contains("!! DNAT of tcp/8080"),
        "{text}"
    );
    assert!(
        std::fs::read_dir(&run).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("diff-")),
        "the diff is kept in the run directory"
    );

    // Iterate on the kept VM: back to the post-apply snapshot, reboot, verify -- red again.
    let vm = Machine::attach(&env.dirs, "askari").unwrap();
    let resets_before = vm
        .events()
        .unwrap()
        .iter()
        .filter(|r| r.is(names::RESET))
        .count();
    // A secret var's value is never stored: without it, a step on the kept VM is refused.
    let o = cli(&ns, &env, &red_runs, "", "verify askari");
    let text = common::text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(
        text.contains("--secret-var secret_probe_marker") && text.contains("export"),
        "{text}"
    );
    let o = cli(&ns, &env, &red_runs, &secret_env(), "reset askari");
    let text = common::text(&o);
    // The reboot printed the secrets on the console again: masked once more.
    assert_no_secret(&[&run, &vm_dir], &text);
    assert_eq!(
        o.status.code(),
        Some(14),
        "reset re-runs reboot + verify, still red:\n{text}"
    );
    assert!(text.contains("published port"), "{text}");
    // Back to the post-apply state from the memory snapshot: no apply runs again, no boot
    // before the reboot under test.
    assert!(
        text.contains(&format!("<== {}: ok", boma_qvm::cycle::kept::RESET_STAGE))
            && !text.contains("==> apply"),
        "{text}"
    );
    assert!(
        text.contains("what changed from before reboot to after reboot")
            && text.contains("!! DNAT of tcp/8080"),
        "reset diffs its reboot against the post-apply state too:\n{text}"
    );
    let ev = vm.events().unwrap();
    assert!(
        ev.iter().any(|r| r.data["kind"] == "snapshot-load"),
        "the snapshot was restored"
    );
    assert!(
        ev.iter().filter(|r| r.is(names::RESET)).count() > resets_before,
        "and the VM rebooted after it"
    );

    // Clean the kept VM away, as an operator would.
    let o = ns.exec(&format!(
        "cd {} && {} make -s test-integration-clean BOMA_QVM={}",
        env!("CARGO_MANIFEST_DIR"),
        clean_env(&env, &red_runs),
        env!("CARGO_BIN_EXE_boma-qvm")
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!env.dirs.vm("boma-it-askari").exists());

    // 2. Green: the same cycle with the docker_host container-forward drop-in.
    let green_runs = env.tmp.path().join("runs-green");
    let out = make(&ns, &env, &green_runs, "", "FIX=1");
    let text = common::text(&out);
    show_summary("green", &text);
    assert!(
        out.status.success(),
        "the fixed state must pass across the reboot:\n{text}"
    );
    let report = read_report(&only_run_dir(&green_runs));
    assert_eq!(report.verdict, Verdict::Pass);
    assert!(report.image.start.starts_with("warm"), "{report:#?}");
    assert_eq!((report.class, report.exit_code), (None, 0));
    assert!(stage(&report, "verify after reboot").ok);
    let diff = report
        .reboot_diff
        .clone()
        .expect("a green run says what the reboot changed too");
    assert!(
        diff.finding("dnat-forward-drop").is_none(),
        "the green diff does not name the drop:\n{}",
        diff.render(200)
    );
    let f = diff
        .finding("dnat-forward-accepted")
        .unwrap_or_else(|| panic!("{}", diff.render(200)));
    assert!(
        f.text
            .contains("`inet filter` (`oifname \"docker0\" accept`)"),
        "the fix's forward accept is what lets it through: {}",
        f.text
    );
    assert!(!report.vm_kept);
    assert!(
        !env.dirs.vm("boma-it-askari").exists(),
        "success destroys the VM and its overlay"
    );
    let left = ns.leftovers(&env.dirs.state);
    assert!(left.is_empty(), "left behind:\n{left}");
}

/// The incident's verdict does not depend on how the VM started: the same red cycle booted
/// from scratch (`COLD=1`, `--cold`) is red for the same reason, as the warm one above is.
#[test]
fn the_incident_is_red_from_a_cold_boot_too() {
    let (env, ns) = with_golden_image("acd");
    let runs = env.tmp.path().join("runs-cold");
    let out = make(&ns, &env, &runs, "", "COLD=1");
    let text = common::text(&out);
    show_summary("red, cold", &text);
    assert!(
        text.contains("Error 14") && text.contains("published port"),
        "boma-qvm exits 14 with the published-port message:\n{text}"
    );
    let report = read_report(&only_run_dir(&runs));
    assert_eq!(report.image.start, "cold", "{report:#?}");
    assert_eq!(
        (report.verdict, report.class, report.exit_code),
        (Verdict::Fail, Some(FailureClass::Test), 14)
    );
    assert!(stage(&report, "verify before reboot").ok, "{report:#?}");
    assert!(!stage(&report, "verify after reboot").ok, "{report:#?}");
    assert!(report.vm_kept);
    let diff = report.reboot_diff.clone().expect("the reboot's diff");
    assert!(
        diff.finding("dnat-forward-drop").is_some(),
        "{}",
        diff.render(200)
    );
    // A red cycle keeps its VM for inspection; remove it as an operator would.
    let down = cli(&ns, &env, &runs, "", "down askari");
    assert!(down.status.success(), "{}", common::text(&down));
    let left = ns.leftovers(&env.dirs.state);
    assert!(left.is_empty(), "left behind:\n{left}");
}

/// A firewall that drops SSH only after the reboot (the fixture's `base_ssh_lockout_at_boot`: a
/// unit, enabled but not started by the apply, that inserts `tcp dport 22 drop` at boot), on the
/// fixture's smallest apply (kiboko: base + docker_host) without the verify before the reboot.
/// The lockout is called within 30 s of the guest's boot-done signal, with the evidence, the
/// lockout class and exit code, and the state after the reboot read through the guest agent.
#[test]
fn a_lockout_after_the_reboot_is_called_soon_after_the_boot_is_done() {
    let (env, ns) = with_golden_image("lock");
    let runs = env.tmp.path().join("runs-lockout");
    let started = std::time::Instant::now();
    let o = cli(
        &ns,
        &env,
        &runs,
        "",
        &format!(
            "cycle kiboko --repo {}/tests/fixtures/boma --certs internal \
             --skip-verify-before-reboot -e base_ssh_lockout_at_boot=true",
            env!("CARGO_MANIFEST_DIR")
        ),
    );
    let text = common::text(&o);
    show_summary("lockout", &text);
    eprintln!("lockout cycle: {:.0}s", started.elapsed().as_secs_f64());
    assert_eq!(o.status.code(), Some(16), "a lockout exits 16:\n{text}");
    assert!(text.contains("FAIL (lockout, exit 16)"), "{text}");
    let run = only_run_dir(&runs);
    let report = read_report(&run);
    assert_eq!(report.class, Some(FailureClass::Lockout), "{report:#?}");
    assert_eq!(report.exit_code, 16);
    assert!(stage(&report, "apply").ok);
    assert!(
        !report.stages.iter().any(|s| s.name.starts_with("verify")),
        "no verify before (skipped) or after (locked out): {report:#?}"
    );
    let reboot = stage(&report, "reboot");
    let why = reboot.error.clone().unwrap_or_default();
    assert!(
        !reboot.ok
            && why.contains("lockout: no SSH after the reboot, while the guest is alive")
            && why.contains("is filtered"),
        "called as a lockout, with how SSH fails: {why}"
    );

    // Within 30 s of the earliest boot-done signal after the reboot.
    let vm = Machine::attach(&env.dirs, "kiboko").unwrap();
    let ev = vm.events().unwrap();
    let reset = ev
        .iter()
        .rposition(|r| r.is(names::RESET))
        .expect("the reboot's RESET");
    let lockout = ev
        .iter()
        .find(|r| r.is(names::LOCKOUT))
        .unwrap_or_else(|| panic!("a LOCKOUT event: {ev:#?}"));
    let console_done = ev[reset..]
        .iter()
        .find(|r| r.is(names::BOOT_DONE))
        .map(|r| r.ts);
    let signalled = lockout.data["boot_done_at"]
        .as_f64()
        .unwrap_or_else(|| panic!("called against a boot-done signal: {lockout:?}"));
    let earliest = console_done.map_or(signalled, |c| c.min(signalled));
    let after = lockout.ts - earliest;
    eprintln!(
        "lockout called {after:.1}s after the boot-done signal ({}), {:.0}s after the reset",
        lockout.data["signal"],
        lockout.ts - ev[reset].ts
    );
    assert!(
        (0.0..=30.0).contains(&after),
        "lockout called {after:.1}s after the boot was done: {lockout:?}"
    );
    assert_eq!(lockout.data["ssh"], "filtered", "{lockout:?}");

    // The state after the reboot, read without SSH, names the rule that did it.
    let st = read_state(&run, "after-reboot");
    assert!(
        st.sections.iter().all(|s| s.source == Source::Agent),
        "read through the guest agent: {st:#?}"
    );
    let diff = report
        .reboot_diff
        .clone()
        .expect("the diff, also after a lockout");
    assert!(
        diff.notes.iter().any(
            |n| n.starts_with("after reboot was read through the guest agent (ssh: known dead")
        ),
        "{diff:#?}"
    );
    let nft = diff.sections.iter().find(|s| s.part == Part::Nft).unwrap();
    assert_eq!(
        (nft.source_before, nft.source_after),
        (Source::Ssh, Source::Agent)
    );
    assert!(
        nft.added
            .contains(&"inet filter chain input: tcp dport 22 drop".to_string()),
        "{}",
        diff.render(200)
    );
    assert!(
        st.lines(Part::Listen)
            .iter()
            .any(|l| l.starts_with("tcp 0.0.0.0:22 sshd")),
        "sshd itself runs: {st:#?}"
    );

    drop(vm);
    let o = cli(&ns, &env, &runs, "", "down kiboko");
    assert!(o.status.success(), "{}", common::text(&o));
    let left = ns.leftovers(&env.dirs.state);
    assert!(left.is_empty(), "left behind:\n{left}");
}
