//! Bad input from a new user's point of view (the sweep in /work/shared/reviews): each case gets
//! a message naming the problem and the fix, the right exit code, and leaves nothing behind.
//! Everything runs the real CLI against a private state, cache and runs directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A private state/cache/runs tree and the CLI pointed at it (and at an empty config file, so the
/// machine's /etc/boma-qvm/config.env does not leak in).
struct Tmp {
    dir: tempfile::TempDir,
}

impl Tmp {
    fn new() -> Tmp {
        common::qemu_account();
        let dir = tempfile::Builder::new()
            .prefix("bqi")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::write(dir.path().join("config.env"), "").unwrap();
        Tmp { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn dirs(&self) -> boma_qvm::paths::Dirs {
        boma_qvm::paths::Dirs::under(self.dir.path())
    }

    fn cli(&self) -> Command {
        self.cli_via(&[])
    }

    /// The CLI run through a wrapper (`nsenter --net=...`), with the same environment.
    fn cli_via(&self, wrapper: &[&str]) -> Command {
        let d = self.dirs();
        let bin = env!("CARGO_BIN_EXE_boma-qvm");
        let mut c = match wrapper {
            [] => Command::new(bin),
            [w, rest @ ..] => {
                let mut c = Command::new(w);
                c.args(rest).arg(bin);
                c
            }
        };
        c.env("BOMA_QVM_STATE_DIR", &d.state)
            .env("BOMA_QVM_CACHE_DIR", &d.cache)
            .env("BOMA_QVM_RUNS_DIR", &d.runs)
            .env("BOMA_QVM_CONFIG", self.path("config.env"))
            .env_remove("BOMA_QVM_MIN_FREE_MIB")
            .env_remove("BOMA_QVM_MAX_VMS")
            .env_remove("BOMA_QVM_IMAGE_URL")
            .env_remove("NO_COLOR");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cli().args(args).output().unwrap()
    }

    /// A small valid qcow2 at `rel`.
    fn qcow2(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg("16M")
            .status()
            .unwrap();
        assert!(st.success());
        p
    }
}

impl Drop for Tmp {
    /// Reap any VM a test left (also when it panicked), as `common::Env` does.
    fn drop(&mut self) {
        let dirs = self.dirs();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(boma_qvm::machine::prune::prune(&dirs))
        })
        .join();
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Exit code `code`, and every one of `needles` in the output.
#[track_caller]
fn expect(o: &Output, code: i32, needles: &[&str]) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(code), "exit code; output:\n{t}");
    for n in needles {
        assert!(t.contains(n), "`{n}` missing from:\n{t}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn logs_are_plain_text_when_stderr_is_not_a_terminal() {
    let t = Tmp::new();
    let q = t.qcow2("small.qcow2");
    let o = t.run(&["image", "import", s(&q)]);
    expect(&o, 0, &["imported"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains('\u{1b}'),
        "ANSI escapes in piped logs: {err:?}"
    );
}

#[test]
fn the_kvm_warning_comes_only_once_the_flags_are_good() {
    if boma_qvm::machine::accel::KvmProbe::read().usable() {
        return; // no fallback warning on a machine with real KVM
    }
    let t = Tmp::new();
    let kernel = t.path("vmlinuz");
    std::fs::write(&kernel, "not really").unwrap();
    let o = t.run(&["up", "w", "--kernel", s(&kernel), "--subnet", "nonsense"]);
    expect(&o, 2, &["`nonsense` is not an IPv4 subnet"]);
    assert!(
        !text(&o).contains("KVM not usable"),
        "warning printed before the refusal:\n{}",
        text(&o)
    );
    assert!(!t.dirs().vm("boma-it-w").exists());
}

/// Entries of the image cache other than its lock: nothing half-made may be left.
fn cache_junk(t: &Tmp) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(t.dirs().images()) else {
        return vec![];
    };
    let mut v: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock")
        .collect();
    v.sort();
    v
}

#[test]
fn import_of_a_directory_or_a_device_says_what_it_is() {
    let t = Tmp::new();
    let dir = t.path("adir");
    std::fs::create_dir(&dir).unwrap();
    let o = t.run(&["image", "import", s(&dir)]);
    expect(
        &o,
        2,
        &["adir is a directory, not a disk image file", "fix:"],
    );
    assert!(!text(&o).contains("does not exist"), "{}", text(&o));
    let o = t.run(&["image", "import", "/dev/zero", "--name", "zero"]);
    expect(&o, 2, &["/dev/zero is a character device", "fix:"]);
    // The good kind stays good: a missing file is "not found".
    let o = t.run(&["image", "import", s(&t.path("nope.qcow2"))]);
    expect(&o, 4, &["nope.qcow2 does not exist"]);
    assert_eq!(cache_junk(&t), Vec::<String>::new());
}

#[test]
fn import_of_a_corrupt_qcow2_is_an_image_error_with_a_fix() {
    let t = Tmp::new();
    let q = t.qcow2("broken.qcow2");
    // Keep the magic (so it is still taken for a qcow2), break the version field.
    let mut bytes = std::fs::read(&q).unwrap();
    bytes[4..8].copy_from_slice(&99u32.to_be_bytes());
    std::fs::write(&q, bytes).unwrap();
    let o = t.run(&["image", "import", s(&q)]);
    expect(
        &o,
        12,
        &[
            "image: ",
            "broken.qcow2 is not a readable disk image",
            "qcow2 version",
            "fix: ",
            "qemu-img check",
        ],
    );
    assert_eq!(cache_junk(&t), Vec::<String>::new());
}

#[test]
fn cycle_with_a_file_for_repo_says_it_is_a_file() {
    let t = Tmp::new();
    let f = t.path("site.yml");
    std::fs::write(&f, "- hosts: all\n").unwrap();
    let o = t.run(&["cycle", "askari", "--repo", s(&f)]);
    expect(
        &o,
        2,
        &[
            "site.yml is a file, not a directory",
            "fix: pass --repo DIR",
        ],
    );
    assert!(!text(&o).contains("does not exist"), "{}", text(&o));
    assert!(!t.dirs().runs.exists(), "a run directory was made");
    assert!(!t.dirs().vm("boma-it-askari").exists());
}

/// A VM that was created but never started (a spec and a run directory, nothing running).
fn made_vm(t: &Tmp, host: &str) -> boma_qvm::machine::rundir::RunDir {
    let spec = boma_qvm::machine::spec::VmSpec::new(
        &format!("boma-it-{host}"),
        boma_qvm::machine::accel::Accel::Tcg,
        boma_qvm::machine::spec::Boot::Kernel {
            kernel: t.path("vmlinuz"),
            initrd: None,
            append: "console=ttyS0".into(),
        },
    );
    let m = boma_qvm::machine::Machine::create(&t.dirs(), &spec).unwrap();
    boma_qvm::machine::rundir::RunDir::new(m.run_dir())
}

#[test]
fn a_vm_dir_without_a_spec_is_marked_broken_and_the_others_still_list() {
    let t = Tmp::new();
    made_vm(&t, "good");
    let bad = t.dirs().vm("boma-it-bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("console.log"), "half a boot\n").unwrap();

    let o = t.run(&["list"]);
    expect(
        &o,
        0,
        &[
            "boma-it-good\toff",
            "boma-it-bad\tBROKEN\t",
            "has no spec.json",
            "fix: remove it with `boma-qvm down boma-it-bad`",
        ],
    );
    let o = t.run(&["status"]);
    expect(
        &o,
        0,
        &[
            "boma-it-good  off",
            "boma-it-bad  BROKEN",
            "has no spec.json",
            "boma-qvm down boma-it-bad",
        ],
    );
    // Named, it is an error with the same fix; `start` says what is wrong, not "does not exist".
    for cmd in ["status", "start"] {
        let o = t.run(&[cmd, "bad"]);
        expect(&o, 2, &["has no spec.json", "boma-qvm down boma-it-bad"]);
        assert!(!text(&o).contains("does not exist"), "{}", text(&o));
    }
    // The fix works, and leaves the good VM alone.
    expect(&t.run(&["down", "bad"]), 0, &["boma-it-bad destroyed"]);
    assert!(!bad.exists());
    let o = t.run(&["list"]);
    expect(&o, 0, &["boma-it-good\toff"]);
    assert!(!text(&o).contains("bad"), "{}", text(&o));
}

#[test]
fn pull_from_a_malformed_url_is_refused_before_anything_starts() {
    let t = Tmp::new();
    for (url, why) in [
        ("ht!tp:/bad url", "relative URL without a base"),
        ("file:///srv/images/", "only http and https"),
    ] {
        let o = t.run(&["image", "pull", "--base-url", url]);
        expect(
            &o,
            2,
            &[
                &format!("`{url}` is not a usable image server URL"),
                why,
                "fix: give the http:// or https:// URL",
            ],
        );
        assert!(!text(&o).contains("check the network"), "{}", text(&o));
    }
    // The same check for the setting, where `up --image cloud` would pull.
    let o = t
        .cli()
        .env("BOMA_QVM_IMAGE_URL", "ht!tp:/bad url")
        .args(["image", "pull"])
        .output()
        .unwrap();
    expect(&o, 2, &["BOMA_QVM_IMAGE_URL"]);
    assert_eq!(cache_junk(&t), Vec::<String>::new());
}

#[test]
fn build_with_a_silly_size_is_refused_before_debootstrap() {
    let t = Tmp::new();
    // 17179869184 GiB << 30 overflows u64 to 0.
    for size in ["0", "1", "4096", "17179869184", "18446744073709551615"] {
        let o = t.run(&["image", "build", "--size-gib", size]);
        expect(
            &o,
            2,
            &[
                &format!("--size-gib {size} is out of range"),
                "fix: give --size-gib between 2 and 2048",
            ],
        );
        assert!(!text(&o).contains("debootstrap"), "{}", text(&o));
    }
    // Nothing started: no build log, no staging directory, no cache at all.
    assert!(!t.dirs().cache.exists(), "{:?}", cache_junk(&t));
}

/// `up HOST` of the busybox test guest: no network, 1 vCPU, 256 MiB.
fn up_guest(t: &Tmp, host: &str) -> Output {
    let (k, i) = common::test_guest();
    t.run(&[
        "up",
        host,
        "--kernel",
        s(&k),
        "--initrd",
        s(&i),
        "--memory",
        "256",
        "--cpus",
        "1",
        "--no-net",
    ])
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &str) -> Child {
    Child(
        Command::new("sh")
            .args(["-c", &format!("exec {cmd}")])
            .spawn()
            .unwrap(),
    )
}

#[test]
fn pid_files_naming_unrelated_processes_do_not_make_a_vm_running() {
    let t = Tmp::new();
    let run = made_vm(&t, "ghost");
    std::fs::write(run.console_log(), "old boot\n").unwrap();
    // Live processes that are not its supervisor or QEMU; one even looks into its run dir.
    let sleeper = spawn("sleep 300");
    let tail = spawn(&format!("tail -f {}", s(&run.console_log())));
    std::fs::write(run.supervisor_pid(), sleeper.0.id().to_string()).unwrap();
    std::fs::write(run.qemu_pid(), tail.0.id().to_string()).unwrap();

    expect(&t.run(&["status", "ghost"]), 0, &["boma-it-ghost  off "]);
    expect(&t.run(&["list"]), 0, &["boma-it-ghost\toff"]);
    let o = t.run(&["reboot", "ghost"]);
    expect(
        &o,
        7,
        &[
            "VM boma-it-ghost is not running",
            "`boma-qvm start boma-it-ghost`",
        ],
    );
    assert!(
        !text(&o).contains("check `boma-qvm status`"),
        "{}",
        text(&o)
    );
    expect(&t.run(&["down", "ghost"]), 0, &["destroyed"]);
    for (what, c) in [("sleep", &sleeper), ("tail", &tail)] {
        assert!(
            common::lite::proc_alive(c.0.id()),
            "`down` killed the unrelated {what}"
        );
    }
}

#[test]
fn a_real_vm_is_running_and_a_dead_qmp_socket_points_somewhere_useful() {
    let t = Tmp::new();
    let o = up_guest(&t, "real");
    expect(&o, 0, &["boma-it-real is up"]);
    expect(&t.run(&["status", "real"]), 0, &["boma-it-real  running "]);
    expect(&t.run(&["list"]), 0, &["boma-it-real\trunning"]);
    std::fs::remove_file(t.dirs().vm("boma-it-real").join("ctl.sock")).unwrap();
    let o = t.run(&["reboot", "--hard", "real"]);
    expect(
        &o,
        8,
        &[
            "cannot connect to",
            "fix: see why in `boma-qvm console boma-it-real --log`",
            "qemu.log",
            "`boma-qvm down boma-it-real`",
        ],
    );
    assert!(
        !text(&o).contains("check `boma-qvm status`"),
        "{}",
        text(&o)
    );
    expect(&t.run(&["down", "real"]), 0, &["destroyed"]);
    assert!(common::qemus_under(&t.dirs().state).is_empty());
}

/// A tmpfs mounted at a path for the test's length.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
        Mount(at.to_path_buf())
    }

    fn is_mounted(&self) -> bool {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(s(&self.0)))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        while self.is_mounted() {
            if nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

#[test]
fn prune_reaps_stale_staging_and_never_follows_a_symlink() {
    let t = Tmp::new();
    let images = t.dirs().images();
    std::fs::create_dir_all(images.join(".tmp-pull-stale/deeper")).unwrap();
    std::fs::write(images.join(".tmp-pull-stale/disk.qcow2"), "partial").unwrap();
    // A staging name that is a symlink to a directory holding a mount and a file of value.
    let target = t.path("elsewhere");
    let mnt = Mount::tmpfs(&target.join("mnt"));
    std::fs::write(target.join("mnt/inside"), "x").unwrap();
    std::fs::write(target.join("precious"), "x").unwrap();
    std::os::unix::fs::symlink(&target, images.join(".tmp-build-link")).unwrap();
    // One that belongs to another user.
    let other = images.join(".tmp-import-other");
    std::fs::create_dir(&other).unwrap();
    std::os::unix::fs::chown(&other, Some(4242), Some(4242)).unwrap();

    // In a network namespace of its own (prune also reaps the network), same mount namespace.
    let ns = common::netns::Netns::new("prune");
    let net = format!("--net=/run/netns/{}", ns.name);
    let o = t.cli_via(&["nsenter", &net]).arg("prune").output().unwrap();
    expect(
        &o,
        0,
        &[
            "image cache: removed 2 stale staging entries",
            ".tmp-pull-stale",
            ".tmp-build-link",
            "belongs to uid 4242",
        ],
    );
    assert!(!images.join(".tmp-pull-stale").exists());
    assert!(
        std::fs::symlink_metadata(images.join(".tmp-build-link")).is_err(),
        "the link is gone"
    );
    assert!(
        mnt.is_mounted(),
        "prune unmounted something a symlink pointed at"
    );
    assert!(target.join("mnt/inside").exists() && target.join("precious").exists());
    assert!(
        other.exists(),
        "another user's staging directory was removed"
    );

    // While an image command holds the cache lock, its staging directory is live: hands off.
    std::fs::create_dir(images.join(".tmp-pull-live")).unwrap();
    let lock = std::fs::File::create(images.join(".lock")).unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let o = t.cli_via(&["nsenter", &net]).arg("prune").output().unwrap();
    expect(&o, 0, &["another image command is running"]);
    assert!(images.join(".tmp-pull-live").exists());
    drop(held);
}

#[test]
fn an_image_command_removes_a_stale_staging_symlink_as_a_link() {
    let t = Tmp::new();
    let images = t.dirs().images();
    std::fs::create_dir_all(&images).unwrap();
    let target = t.path("elsewhere");
    let mnt = Mount::tmpfs(&target.join("mnt"));
    std::fs::write(target.join("mnt/inside"), "x").unwrap();
    std::os::unix::fs::symlink(&target, images.join(".tmp-pull-link")).unwrap();
    // Any image command takes the lock and reaps stale staging entries first.
    let o = t.run(&["image", "rm", "nosuch"]);
    expect(&o, 4, &["golden image `nosuch` does not exist"]);
    assert!(std::fs::symlink_metadata(images.join(".tmp-pull-link")).is_err());
    assert!(mnt.is_mounted(), "the cleanup unmounted through a symlink");
    assert!(target.join("mnt/inside").exists());
}

/// The case: `ln -s / .tmp-x` in the cache, then a root image command. It must remove
/// the link as a link and detach no mount. The command runs in a private mount namespace (a
/// cleanup that did follow the link would detach every mount under `/`: only there), which
/// records its mount table before and after, unchanged by anything else on the machine.
#[test]
fn a_staging_symlink_to_the_root_directory_unmounts_nothing() {
    let t = Tmp::new();
    let images = t.dirs().images();
    std::fs::create_dir_all(&images).unwrap();
    // A mount of our own that any unmount "under /" would take with it.
    let _mnt = Mount::tmpfs(&t.path("host-mount"));
    std::os::unix::fs::symlink("/", images.join(".tmp-x")).unwrap();
    let (before, after) = (t.path("mounts-before"), t.path("mounts-after"));
    let script = format!(
        "cat /proc/self/mounts > {0}; \"$@\"; rc=$?; cat /proc/self/mounts > {1}; exit $rc",
        s(&before),
        s(&after)
    );
    let o = t
        .cli_via(&[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .args(["image", "rm", "nosuch"])
        .output()
        .unwrap();
    expect(&o, 4, &["golden image `nosuch` does not exist"]);
    assert!(std::fs::symlink_metadata(images.join(".tmp-x")).is_err());
    let points = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
            .collect()
    };
    let (b, a) = (points(&before), points(&after));
    assert!(b.contains(&s(&t.path("host-mount")).to_string()), "{b:?}");
    assert_eq!(a, b, "the image command changed the mount table");
}

/// A cache the group can write (the role's old 2775) is refused before anything in it is acted
/// on: the planted link stays, nothing is unmounted, and the message names the fix.
#[test]
fn a_cache_others_can_write_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let t = Tmp::new();
    let images = t.dirs().images();
    std::fs::create_dir_all(&images).unwrap();
    let target = t.path("elsewhere");
    let mnt = Mount::tmpfs(&target.join("mnt"));
    std::fs::write(target.join("mnt/inside"), "x").unwrap();
    std::os::unix::fs::symlink(&target, images.join(".tmp-pull-x")).unwrap();
    std::fs::set_permissions(&images, std::fs::Permissions::from_mode(0o2775)).unwrap();
    let q = t.qcow2("small.qcow2");
    for args in [
        vec!["image", "rm", "nosuch"],
        vec!["image", "import", s(&q)],
        vec!["image", "list"],
    ] {
        let o = t.run(&args);
        expect(
            &o,
            12,
            &[
                "refusing to use the image cache",
                "writable by its group",
                "chmod go-w",
            ],
        );
    }
    let ns = common::netns::Netns::new("prunew");
    let net = format!("--net=/run/netns/{}", ns.name);
    let o = t.cli_via(&["nsenter", &net]).arg("prune").output().unwrap();
    expect(&o, 12, &["writable by its group"]);
    assert!(std::fs::symlink_metadata(images.join(".tmp-pull-x")).is_ok());
    assert!(mnt.is_mounted() && target.join("mnt/inside").exists());
}

/// Names in the image cache that start with `.tmp-`.
fn staging(t: &Tmp) -> Vec<String> {
    cache_junk(t)
        .into_iter()
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

/// Send `sig` to a pull that is mid-download; it must exit 128+sig, say so, and leave no
/// staging directory.
async fn interrupt_a_pull(sig: nix::sys::signal::Signal, code: i32) {
    use common::http::{Reply, Server};
    let t = Tmp::new();
    let srv = Server::start().await;
    let file = "debian-13-genericcloud-amd64.qcow2";
    srv.set_sums(file, &"a".repeat(128));
    srv.set(
        file,
        Reply::Stall {
            body: vec![0x55; 4 << 20],
            claimed: 64 << 20,
        },
    );
    let child = tokio::process::Command::from(t.cli())
        .args(["image", "pull", "--base-url", &srv.base_url()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    // Mid-download: the staging directory holds part of the file.
    while !staging(&t).iter().any(|n| {
        std::fs::metadata(t.dirs().images().join(n).join("disk.qcow2")).is_ok_and(|m| m.len() > 0)
    }) {
        assert!(t0.elapsed().as_secs() < 30, "the pull never started");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, sig).unwrap();
    let o = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the pull did not stop")
        .unwrap();
    expect(
        &o,
        code,
        &[
            &format!("interrupted by {sig}"),
            "image cache: no stale staging directories",
        ],
    );
    assert_eq!(staging(&t), Vec::<String>::new(), "partial download left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_or_sigterm_during_a_pull_leaves_no_partial_download() {
    interrupt_a_pull(nix::sys::signal::Signal::SIGINT, 130).await;
    interrupt_a_pull(nix::sys::signal::Signal::SIGTERM, 143).await;
}

#[tokio::test]
async fn sigint_of_up_during_the_wait_says_what_is_left_and_down_reaps_it() {
    let t = Tmp::new();
    let ns = common::netns::Netns::new("upint");
    let net = format!("--net=/run/netns/{}", ns.name);
    let (k, i) = common::test_guest();
    // With the network but without `boma.net=1` the guest never asks for a lease: `up` waits.
    let child = tokio::process::Command::from(t.cli_via(&["nsenter", &net]))
        .args(["up", "lw", "--kernel", s(&k), "--initrd", s(&i)])
        .args(["--memory", "256", "--cpus", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run = t.dirs().vm("boma-it-lw");
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(run.join("console.log")).is_ok_and(|c| c.contains(common::READY))
    {
        assert!(t0.elapsed().as_secs() < 120, "the guest never booted");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let o = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("up did not stop")
        .unwrap();
    expect(
        &o,
        130,
        &[
            "interrupted by SIGINT during `up lw`",
            "VM boma-it-lw is running",
            "`boma-qvm console lw --log`",
            "the isolated network is up (bridge boma-qvm0",
            "VMs on it: boma-it-lw",
            "fix: `boma-qvm down lw`",
        ],
    );
    // It is as the message says, and the fix reaps all of it.
    expect(&t.run(&["status", "lw"]), 0, &["boma-it-lw  running "]);
    let o = t
        .cli_via(&["nsenter", &net])
        .args(["down", "lw"])
        .output()
        .unwrap();
    expect(&o, 0, &["boma-it-lw destroyed"]);
    assert!(common::qemus_under(&t.dirs().state).is_empty());
    assert!(
        ns.exec("ip link show boma-qvm0").status.code() != Some(0),
        "the bridge outlived `down`"
    );
    assert!(ns.pids().is_empty(), "processes left in the namespace");
}

impl Tmp {
    /// Write the config file the CLI reads.
    fn config(&self, text: &str) -> String {
        let p = self.path("config.env");
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

#[test]
fn a_bad_value_in_config_env_names_the_file_and_line() {
    let t = Tmp::new();
    let cfg = t.config("# machine defaults\nBOMA_QVM_MAX_VMS=1\nBOMA_QVM_MIN_FREE_MIB=-5\n");
    let kernel = t.path("vmlinuz");
    std::fs::write(&kernel, "k").unwrap();
    let blame = format!("BOMA_QVM_MIN_FREE_MIB=-5 (from line 3 of {cfg}) is not a whole number");
    let fix = format!("fix: fix line 3 of {cfg}: BOMA_QVM_MIN_FREE_MIB=");
    for args in [
        &["up", "c", "--kernel", s(&kernel), "--no-net"][..],
        &["start", "c"],
    ] {
        let o = t.run(args);
        expect(&o, 2, &[&blame, &fix]);
        assert!(!text(&o).contains("--min-free-mib"), "{}", text(&o));
    }
    assert!(!t.dirs().vms().exists(), "something was made");
    // Commands that only look or clean up go on, with the same words as a warning.
    let o = t.run(&["list"]);
    expect(&o, 0, &[&format!("warning: {blame}")]);
}

#[test]
fn garbage_in_config_env_is_warned_about_line_by_line() {
    let t = Tmp::new();
    let cfg = t.config("nonsense\nBOMA_QVM_MAX_VM=2\nBOMA_QVM_MAX_VMS=1\n");
    let o = t.run(&["list"]);
    expect(
        &o,
        0,
        &[
            &format!("warning: {cfg} line 1: `nonsense` is not KEY=value; ignored"),
            &format!("warning: {cfg} line 2: BOMA_QVM_MAX_VM is not a boma-qvm setting"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 2);
}

#[test]
fn boma_qvm_config_naming_a_directory_or_a_missing_file_is_refused() {
    let t = Tmp::new();
    let o = t
        .cli()
        .env("BOMA_QVM_CONFIG", t.path(""))
        .arg("list")
        .output()
        .unwrap();
    expect(
        &o,
        2,
        &[
            "is a directory, not a config file",
            "fix: point BOMA_QVM_CONFIG",
        ],
    );
    let o = t
        .cli()
        .env("BOMA_QVM_CONFIG", t.path("nope.env"))
        .arg("list")
        .output()
        .unwrap();
    expect(
        &o,
        4,
        &[
            "nope.env (BOMA_QVM_CONFIG) does not exist",
            "fix: point BOMA_QVM_CONFIG",
        ],
    );
}

#[test]
fn doctor_fails_on_a_setting_exactly_as_up_would() {
    let t = Tmp::new();
    let with = |args: &[&str]| {
        t.cli()
            .env("BOMA_QVM_MIN_FREE_MIB", "lots")
            .args(args)
            .output()
            .unwrap()
    };
    let blame = "BOMA_QVM_MIN_FREE_MIB=lots (from the environment) is not a whole number of MiB";
    let o = with(&["doctor"]);
    expect(
        &o,
        2,
        &[
            &format!("BAD SETTING: {blame}"),
            "fix: set BOMA_QVM_MIN_FREE_MIB",
        ],
    );
    assert!(!text(&o).contains("all good"), "{}", text(&o));
    let kernel = t.path("vmlinuz");
    std::fs::write(&kernel, "k").unwrap();
    let o = with(&["up", "d", "--kernel", s(&kernel), "--no-net"]);
    expect(&o, 2, &[&format!("error: {blame}")]);
    assert!(!text(&o).contains("--min-free-mib"), "{}", text(&o));
}

#[test]
fn an_unusable_state_cache_or_runs_dir_names_its_setting() {
    let t = Tmp::new();
    let file = t.path("plainfile");
    std::fs::write(&file, "").unwrap();
    let kernel = t.path("vmlinuz");
    std::fs::write(&kernel, "k").unwrap();
    let state_is = |dir: &Path, args: &[&str]| {
        t.cli()
            .env("BOMA_QVM_STATE_DIR", dir)
            .args(args)
            .output()
            .unwrap()
    };
    // The state dir is a regular file: even `status` says so instead of "no VMs".
    for args in [
        &["status"][..],
        &["list"],
        &["up", "f", "--kernel", s(&kernel), "--no-net"],
    ] {
        let o = state_is(&file, args);
        expect(
            &o,
            2,
            &[
                &format!(
                    "the state directory {} (BOMA_QVM_STATE_DIR from the environment) is a regular file, not a directory",
                    s(&file)
                ),
                "fix: point BOMA_QVM_STATE_DIR (or --state-dir) at a directory",
            ],
        );
        assert!(!text(&o).contains("no VMs"), "{}", text(&o));
    }
    // Under /proc, and under a file.
    let o = state_is(
        Path::new("/proc/bq-state"),
        &["up", "f", "--kernel", s(&kernel), "--no-net"],
    );
    expect(
        &o,
        2,
        &["/proc/bq-state (BOMA_QVM_STATE_DIR from the environment) is on procfs"],
    );
    let o = state_is(&file.join("state"), &["net", "status"]);
    expect(
        &o,
        2,
        &["cannot be created: ", "plainfile is a regular file"],
    );
    // The flag is named when the flag gave it.
    let q = t.qcow2("q.qcow2");
    let o = t.run(&["--cache-dir", "/proc/bq-cache", "image", "import", s(&q)]);
    expect(
        &o,
        2,
        &[
            "the cache directory /proc/bq-cache (--cache-dir) is on procfs",
            "fix: pass --cache-dir",
        ],
    );
    // And the config file's line, when it came from there.
    let cfg = t.config(&format!("BOMA_QVM_RUNS_DIR={}/runs\n", s(&file)));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/boma");
    let o = t
        .cli()
        .env_remove("BOMA_QVM_RUNS_DIR")
        .args(["cycle", "askari", "--repo", s(&repo)])
        .output()
        .unwrap();
    expect(
        &o,
        2,
        &[
            &format!(
                "the runs directory {}/runs (BOMA_QVM_RUNS_DIR from line 1 of {cfg})",
                s(&file)
            ),
            &format!("fix: fix line 1 of {cfg}: BOMA_QVM_RUNS_DIR="),
        ],
    );
    assert!(!t.dirs().state.exists(), "the state dir was made");
}
