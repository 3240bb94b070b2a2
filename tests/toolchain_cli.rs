//! The installed toolchain as a new user meets it: the CLI under `env -i` with only the system
//! PATH and HOME, so nothing the test process's environment happens to hold (a venv on PATH,
//! cargo's variables) can hide a missing install step. Ansible must come from
//! BOMA_QVM_ANSIBLE_DIR in the config file (BOMA_QVM_CONFIG points at a per-test one).

mod common;

use common::netns::Netns;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The PATH a fresh login (or `env -i` in .ci/run) has: no venv, no ~/.cargo/bin.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const BIN: &str = env!("CARGO_BIN_EXE_boma-qvm");

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The directory of a working ansible-playbook on this machine: the one the role recorded (or
/// this process's BOMA_QVM_ANSIBLE_DIR), else PATH's.
fn real_ansible_dir() -> PathBuf {
    let recorded = boma_qvm::config_file::value_in(
        Path::new(boma_qvm::config_file::DEFAULT_PATH),
        boma_qvm::ansible::DIR_VAR,
    )
    .map(PathBuf::from);
    std::env::var_os(boma_qvm::ansible::DIR_VAR)
        .map(PathBuf::from)
        .into_iter()
        .chain(recorded)
        .chain(
            boma_qvm::tools::find("ansible-playbook").and_then(|p| p.parent().map(Path::to_path_buf)),
        )
        .find(|d| boma_qvm::tools::find(d.join("ansible-playbook").to_str().unwrap()).is_some())
        .expect("no ansible-playbook on this machine (BOMA_QVM_ANSIBLE_DIR, /etc/boma-qvm/config.env, PATH): run .ci/setup")
}

/// A throwaway config file and state directory.
struct World {
    tmp: tempfile::TempDir,
}

impl World {
    fn new(config: &str) -> World {
        common::qemu_account();
        let tmp = tempfile::Builder::new()
            .prefix("bqt")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::write(tmp.path().join("config.env"), config).unwrap();
        World { tmp }
    }

    fn config(&self) -> PathBuf {
        self.tmp.path().join("config.env")
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn runs(&self) -> PathBuf {
        self.tmp.path().join("runs")
    }

    /// `env -i PATH=<system> HOME=$HOME BOMA_QVM_CONFIG=.. BOMA_QVM_STATE_DIR=.. BOMA_QVM_RUNS_DIR=..
    /// [extra..] argv..`, inside `ns` when given (so doctor sees that namespace's empty nft
    /// ruleset, not whatever the host's holds).
    fn clean(&self, ns: Option<&Netns>, extra: &[String], argv: &[&str]) -> Command {
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, "env", "-i"]);
                c
            }
            None => {
                let mut c = Command::new("env");
                c.arg("-i");
                c
            }
        };
        c.arg(format!("PATH={SYSTEM_PATH}"))
            .arg(format!("HOME={}", std::env::var("HOME").unwrap()))
            .arg(format!("BOMA_QVM_CONFIG={}", self.config().display()))
            .arg(format!("BOMA_QVM_STATE_DIR={}", self.state().display()))
            .arg(format!("BOMA_QVM_RUNS_DIR={}", self.runs().display()))
            .args(extra)
            .args(argv);
        c
    }

    /// The README's main job, `make test-integration HOST=askari`, in a clean environment.
    fn main_job(&self, knobs: &[&str]) -> Output {
        let bomaq = format!("BOMA_QVM={BIN}");
        let mut argv = vec![
            "make",
            "-s",
            "test-integration",
            "HOST=askari",
            bomaq.as_str(),
        ];
        argv.extend(knobs);
        self.clean(None, &[], &argv)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    }

    fn nothing_made(&self) {
        let vms: Vec<_> = std::fs::read_dir(self.state().join("vms"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(vms.is_empty(), "no VM made: {vms:?}");
        assert!(!self.runs().exists(), "no run directory made");
    }
}

#[test]
fn doctor_under_env_i_runs_the_ansible_the_config_records() {
    let real = real_ansible_dir();
    let w = World::new(&format!("BOMA_QVM_ANSIBLE_DIR={}\n", real.display()));
    let ns = Netns::new("doc");
    let o = w.clean(Some(&ns), &[], &[BIN, "doctor"]).output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "ok: ansible-playbook {}/ansible-playbook (ansible-core 2.",
            real.display()
        )),
        "{t}"
    );
    assert!(
        t.contains(&format!(
            "from BOMA_QVM_ANSIBLE_DIR={} (set in {})",
            real.display(),
            w.config().display()
        )),
        "{t}"
    );
    assert!(t.contains("doctor: all good"), "{t}");

    // The environment wins over the file, and doctor says so.
    let stale = World::new("BOMA_QVM_ANSIBLE_DIR=/nonexistent/bin\n");
    let o = stale
        .clean(
            Some(&ns),
            &[format!("BOMA_QVM_ANSIBLE_DIR={}", real.display())],
            &[BIN, "doctor"],
        )
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "from BOMA_QVM_ANSIBLE_DIR={} (set in the environment)",
            real.display()
        )),
        "{t}"
    );
}

/// The user's situation after a move or a deleted venv: the config names a directory with no
/// Ansible in it. Both doctor and the main job name the setting and the file, and the job stops
/// before it makes anything.
#[test]
fn a_stale_recorded_ansible_is_named_by_doctor_and_by_the_main_job() {
    let empty = tempfile::tempdir().unwrap();
    let w = World::new(&format!(
        "BOMA_QVM_ANSIBLE_DIR={}\n",
        empty.path().display()
    ));
    let ns = Netns::new("stale");
    let o = w.clean(Some(&ns), &[], &[BIN, "doctor"]).output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(
        t.contains(&format!(
            "MISSING: `ansible-playbook` was not found in BOMA_QVM_ANSIBLE_DIR={} (set in {})",
            empty.path().display(),
            w.config().display()
        )),
        "{t}"
    );

    let o = w.main_job(&[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "`ansible-inventory` was not found in BOMA_QVM_ANSIBLE_DIR={}",
            empty.path().display()
        )),
        "{t}"
    );
    assert!(
        t.contains(&format!(
            "fix: fix BOMA_QVM_ANSIBLE_DIR in {}",
            w.config().display()
        )),
        "{t}"
    );
    assert!(
        t.contains("test-integration] Error 3"),
        "boma-qvm exits 3 (missing tool): {t}"
    );
    w.nothing_made();
}

/// The README's main job under `env -i` gets through the profile check, which reads the real
/// inventory with `ansible-inventory` from the recorded directory. The input checks then stop,
/// cheaply and on purpose, at the cert tier (le-staging without GANDI_API_KEY), which comes
/// after the profile, before anything boots.
#[test]
fn the_main_job_under_env_i_reads_the_inventory_with_the_recorded_ansible() {
    let real = real_ansible_dir();
    let w = World::new(&format!("BOMA_QVM_ANSIBLE_DIR={}\n", real.display()));
    let o = w.main_job(&["CERTS=le-staging"]);
    let t = text(&o);
    assert!(
        t.contains("needs the Gandi LiveDNS API key") && !t.contains("ansible-inventory"),
        "the profile check passed and the cert tier's came next: {t}"
    );
    assert!(t.contains("test-integration] Error 2"), "{t}");
    w.nothing_made();
}

/// The seconds figure on the line of `t` that starts with `prefix` (`<prefix>12.3 s`).
fn figure(t: &str, prefix: &str) -> f64 {
    let line = t
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line `{prefix}...` in:\n{t}"));
    line.trim_end_matches(" s")
        .parse()
        .unwrap_or_else(|e| panic!("`{line}`: {e}"))
}

/// What a boot test must leave behind: nothing. No VM directory, and no process in the
/// namespace it ran in (the supervisor and QEMU were started inside it).
fn nothing_left(w: &World, ns: &Netns) {
    assert!(
        !w.state()
            .join("vms")
            .join(boma_qvm::machine::boottest::VM_NAME)
            .exists(),
        "the boot test's VM directory is gone"
    );
    let left: Vec<String> = ns
        .pids()
        .iter()
        .map(|p| boma_qvm::machine::procs::cmdline(*p).join(" "))
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(common::qemus_under(&w.state()).is_empty());
}

/// `doctor --boot-test --accel tcg`, from the binary alone (the guest's sources are embedded),
/// under env -i: the printed READY and reboot figures, a clean power-off, nothing left.
#[test]
fn doctor_boot_test_times_ready_and_a_clean_reboot_and_leaves_nothing() {
    let real = real_ansible_dir();
    let w = World::new(&format!("BOMA_QVM_ANSIBLE_DIR={}\n", real.display()));
    let ns = Netns::new("boot");
    // The suite's guest cache: built once per machine, shared with the other VM tests.
    let cache = format!(
        "BOMA_QVM_CACHE_DIR={}",
        boma_qvm::paths::Dirs::from_env().cache.display()
    );
    let o = w
        .clean(
            Some(&ns),
            &[cache],
            &[BIN, "doctor", "--boot-test", "--accel", "tcg"],
        )
        .current_dir("/")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("boot test: the busybox test guest under tcg, no network"),
        "{t}"
    );
    let ready = figure(&t, "boot test: QEMU start -> READY: ");
    let reboot = figure(
        &t,
        "boot test: clean reboot (ACPI power button -> guest shutdown path -> reset -> READY): ",
    );
    assert!(ready > 0.0 && ready < 150.0, "{t}");
    assert!(reboot > 0.0 && reboot < 300.0, "{t}");
    assert!(
        t.contains("ok: boot test passed under tcg; the guest powered off cleanly"),
        "{t}"
    );
    nothing_left(&w, &ns);
}

/// A guest that does not reach READY in time (what a hung KVM guest does) is a timeout with a
/// fix, exit 9, and still leaves nothing behind. Under TCG READY takes seconds, so a 1 s limit
/// always trips.
#[test]
fn a_boot_test_that_misses_ready_times_out_with_a_fix_and_leaves_nothing() {
    let w = World::new("");
    let ns = Netns::new("hang");
    let cache = format!(
        "BOMA_QVM_CACHE_DIR={}",
        boma_qvm::paths::Dirs::from_env().cache.display()
    );
    let o = w
        .clean(
            Some(&ns),
            &[cache],
            &[
                BIN,
                "doctor",
                "--boot-test",
                "--accel",
                "tcg",
                "--boot-timeout",
                "1",
            ],
        )
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(9), "{t}");
    assert!(
        t.contains(
            "timed out after 1s waiting for `BOMA-TESTGUEST-READY` on boma-it-doctor's console"
        ),
        "{t}"
    );
    assert!(
        t.contains("fix: under TCG the guest normally reaches READY in seconds"),
        "{t}"
    );
    nothing_left(&w, &ns);
}
