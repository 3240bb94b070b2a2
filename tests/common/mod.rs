//! Shared test support: the busybox test guest (tests/guest/build.sh, run by
//! `boma_qvm::guest::testguest` and cached outside the repo), a per-test state directory that is pruned
//! on drop (also when the test panics), and the CLI under test.
#![allow(dead_code)]

pub mod faults;
pub mod http;
pub mod lite;
pub mod netns;
pub mod users;
pub mod world;

use boma_qvm::machine::accel::Accel;
use boma_qvm::machine::spec::{Boot, VmSpec};
use boma_qvm::machine::{Machine, StartOptions};
use boma_qvm::paths::Dirs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const READY: &str = "BOMA-TESTGUEST-READY";
pub const BOOT: &str = "BOMA-TESTGUEST-BOOT";

/// The test guest's kernel and initrd, built once per machine into the XDG cache, in a
/// directory named after a hash of its sources: worktrees with different guests never rebuild
/// over each other. The same builder `doctor --boot-test` uses (the sources embedded in the
/// library, see `boma_qvm::guest::testguest`).
pub fn test_guest() -> (PathBuf, PathBuf) {
    qemu_account();
    let g = boma_qvm::guest::testguest::ensure(&Dirs::from_env().cache)
        .unwrap_or_else(|e| panic!("building the test guest failed: {e}"));
    (g.kernel, g.initrd)
}

/// `boma-qvm up HOST` of the busybox test guest (`kernel`, `initrd`, kernel command line
/// `append`), 256 MiB and one vCPU, as the CLI takes it.
pub fn guest_up_args(host: &str, kernel: &Path, initrd: &Path, append: &str) -> Vec<String> {
    let (k, i) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    [
        "up", host, "--kernel", k, "--initrd", i, "--append", append, "--memory", "256", "--cpus",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The account QEMU is dropped to when root starts a VM (tests run as root). The
/// integration_test role creates it (`make setup`); a machine set up before it existed gets it
/// here, made exactly as the role makes it. It is a machine-wide prerequisite like QEMU itself,
/// so it is left in place.
pub fn qemu_account() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Tests build their networks in namespaces they made: never through a netd the machine
        // runs (the role's boma-qvm-netd.service works in the host's namespace). Tests that
        // want a netd start their own and name its socket.
        // SAFETY: called before the test starts any thread of its own that reads the
        // environment (the first Env or test guest of the test).
        unsafe { std::env::set_var(boma_qvm::net::netd::SOCKET_VAR, "none") };
        let name = boma_qvm::machine::qemu::account::DEFAULT_ACCOUNT;
        if nix::unistd::User::from_name(name).ok().flatten().is_some() {
            return;
        }
        // As the role does: the kvm group first (a machine without QEMU's udev rules lacks it;
        // "already exists", exit 9, is fine). Another test binary may be creating the account
        // right now: useradd's own lock serialises, and "already exists" (exit 9) is fine.
        let _ = Command::new("groupadd").args(["--system", "kvm"]).status();
        let st = Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
            .args(["--shell", "/usr/sbin/nologin", "--groups", "kvm", name])
            .status()
            .expect("useradd runs");
        assert!(
            st.success() || st.code() == Some(9),
            "useradd {name} failed ({st}); run `make setup` (the role creates it)"
        );
    });
}

/// Running the CLI: `env.cli().run(&["status"])`, or `.ok(..)` when it must succeed.
pub trait Run {
    fn run(&mut self, args: &[&str]) -> std::process::Output;
    /// Its stdout; panics with both streams when it fails.
    fn ok(&mut self, args: &[&str]) -> String;
}

impl Run for Command {
    fn run(&mut self, args: &[&str]) -> std::process::Output {
        self.args(args).output().expect("run boma-qvm")
    }

    fn ok(&mut self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "`boma-qvm {}` failed:\n{}",
            args.join(" "),
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

/// A finished command's status, stdout and stderr, for assertion messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An exclusive flock on `path`, or a panic saying who waited how long for what.
pub fn lock_or_panic(path: &Path, wait: Duration) -> nix::fcntl::Flock<std::fs::File> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = std::time::Instant::now() + wait;
    let mut file = std::fs::File::create(path).unwrap();
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return l,
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                file = f;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err((_, e)) => {
                let path = path.display();
                panic!(
                    "waited {}s for the lock {path} ({e}): another test process holds it; \
                     `fuser {path}` shows which",
                    wait.as_secs()
                )
            }
        }
    }
}

/// A throwaway state dir under /tmp (short, for unix socket paths). Dropping it prunes every VM
/// it holds and removes it, also when the test panicked.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub dirs: Dirs,
}

impl Env {
    pub fn new() -> Env {
        qemu_account();
        let tmp = tempfile::Builder::new()
            .prefix("bq")
            .tempdir_in("/tmp")
            .unwrap();
        let mut dirs = Dirs::under(tmp.path());
        dirs.cache = Dirs::from_env().cache;
        Env { tmp, dirs }
    }

    /// The CLI, pointed at this env's state and cache dirs: the one way tests run it.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_boma-qvm"));
        self.point(&mut c);
        c
    }

    /// The CLI inside network namespace `ns` (`ip netns exec`), pointed like `cli`.
    pub fn cli_in(&self, ns: &netns::Netns) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_boma-qvm")]);
        self.point(&mut c);
        c
    }

    fn point(&self, c: &mut Command) {
        c.env("BOMA_QVM_STATE_DIR", &self.dirs.state)
            .env("BOMA_QVM_CACHE_DIR", &self.dirs.cache)
            .env("BOMA_QVM_RUNS_DIR", self.tmp.path().join("runs"))
            .env(boma_qvm::net::netd::SOCKET_VAR, "none");
    }

    /// A test-guest VM spec: 1 vCPU is plenty for busybox and leaves the other core to the host.
    pub fn guest_spec(&self, host: &str, extra_append: &str) -> VmSpec {
        let (kernel, initrd) = test_guest();
        let append = format!("console=ttyS0 {extra_append}").trim().to_string();
        let mut spec = VmSpec::new(
            &format!("boma-it-{host}"),
            Accel::Tcg,
            Boot::Kernel {
                kernel,
                initrd: Some(initrd),
                append,
            },
        );
        spec.cpus = 1;
        spec.memory_mib = 256;
        spec
    }

    /// Create and start a test guest and wait for its READY marker; the cursors are past it.
    pub async fn boot(&self, host: &str, extra_append: &str) -> Machine {
        self.boot_spec(self.guest_spec(host, extra_append)).await
    }

    /// Create and start a VM from `spec` and wait for the test guest's READY marker.
    pub async fn boot_spec(&self, spec: VmSpec) -> Machine {
        let m = Machine::create(&self.dirs, &spec)
            .unwrap()
            .with_start_options(start_options());
        m.start().await.unwrap();
        m.expect_console(READY, Duration::from_secs(120))
            .await
            .unwrap();
        m
    }
}

/// Removes the directory under /run that the state `dirs` made for its dnsmasq's re-read files
/// (root with a private state dir), when dropped: a test that failed before `net down` leaves
/// none behind (its network objects go with its namespace; /run is the host's).
pub struct DnsmasqDir(PathBuf);

impl DnsmasqDir {
    pub fn of(dirs: &Dirs) -> DnsmasqDir {
        DnsmasqDir(boma_qvm::net::files::NetFiles::new(dirs).public_dir())
    }
}

impl Drop for DnsmasqDir {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.is_dir()) {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        drop(DnsmasqDir::of(&self.dirs));
        let dirs = self.dirs.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(boma_qvm::machine::prune::prune(&dirs))
        })
        .join();
    }
}

pub fn start_options() -> StartOptions {
    StartOptions {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_boma-qvm")),
        min_free_mib: None,
        max_vms: 1,
        timeout: Duration::from_secs(60),
    }
}

/// QEMU processes running under `dir` (QEMU's cwd is its run directory).
pub fn qemus_under(dir: &Path) -> Vec<i32> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    boma_qvm::machine::prune::qemus_in(&dir)
}

pub fn event_names(vm: &Machine) -> Vec<String> {
    vm.events().unwrap().into_iter().map(|r| r.event).collect()
}

/// The dnsmasq whose pid file is `pid_file` runs as `nobody`; its pid.
pub fn assert_dnsmasq_runs_as_nobody(pid_file: &Path) -> i32 {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(
        boma_qvm::machine::procs::uid(pid),
        Some(nobody.uid.as_raw()),
        "dnsmasq (pid {pid}) dropped to nobody"
    );
    pid
}
