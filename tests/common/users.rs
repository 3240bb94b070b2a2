//! Real unprivileged users for tests (useradd, removed on drop with everything they ran), and
//! a real netd (`boma-qvm netd`, root, in a network namespace the test made), stopped on drop.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::netns::Netns;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The operators' group (netd's socket), as the integration_test role makes it. A machine-wide
/// prerequisite like the QEMU account: made when missing, left in place.
pub fn operators_group() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let g = boma_qvm::net::netd::DEFAULT_GROUP;
        if nix::unistd::Group::from_name(g).ok().flatten().is_some() {
            return;
        }
        let st = Command::new("groupadd")
            .args(["--system", g])
            .status()
            .unwrap();
        assert!(
            st.success() || st.code() == Some(9),
            "groupadd {g} failed ({st}); run `make setup` (the role creates it)"
        );
    });
}

/// A throwaway user in groups boma-qvm and kvm, with a home of its own in a directory others
/// can enter. Dropping it kills what it still runs (by uid, from /proc) and removes it.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Enterable by others (0755): its home, a state dir, files handed to it.
    pub dir: tempfile::TempDir,
}

impl TestUser {
    pub fn new() -> TestUser {
        operators_group();
        super::qemu_account();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("bqu{}x{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("bqu")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = dir.path().join("home");
        let st = Command::new("useradd")
            .args(["--create-home", "--home-dir"])
            .arg(&home)
            .args(["--groups", "boma-qvm,kvm", "--shell", "/bin/sh", &name])
            .status()
            .unwrap();
        assert!(st.success(), "useradd {name}: {st}");
        let u = nix::unistd::User::from_name(&name).unwrap().unwrap();
        TestUser {
            name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            dir,
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn state(&self) -> PathBuf {
        self.home().join("state")
    }

    /// A copy of `file` this user can read (the test guest lives in root's cache).
    pub fn give(&self, file: &Path) -> PathBuf {
        let to = self.dir.path().join(file.file_name().unwrap());
        std::fs::copy(file, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
        to
    }

    /// `cmd` as this user (setpriv: its uid, gid and groups), in a clean environment with the
    /// system PATH, its HOME and state dir, and `env`.
    pub fn command(&self, cmd: &str, env: &[(&str, &str)]) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--init-groups")
            .args(["--", "env", "-i"])
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .arg(format!("HOME={}", self.home().display()))
            .arg(format!("BOMA_QVM_STATE_DIR={}", self.state().display()))
            .arg(format!(
                "BOMA_QVM_CACHE_DIR={}",
                self.dir.path().join("cache").display()
            ));
        for (k, v) in env {
            c.arg(format!("{k}={v}"));
        }
        c.arg(cmd).current_dir(self.dir.path());
        c
    }

    /// The CLI under test as this user.
    pub fn cli(&self, env: &[(&str, &str)]) -> Command {
        self.command(env!("CARGO_BIN_EXE_boma-qvm"), env)
    }

    /// Every live process running as this user, with its argv.
    pub fn pids(&self) -> Vec<(i32, String)> {
        use boma_qvm::machine::procs;
        procs::find(|_| true)
            .into_iter()
            .filter(|p| procs::uid(*p) == Some(self.uid) && procs::alive(*p))
            .map(|p| (p, procs::cmdline(p).join(" ")))
            .collect()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for (p, _) in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = Command::new("userdel").args(["-r", &self.name]).output();
    }
}

/// `boma-qvm netd` as root inside `ns`, its socket and state in a directory others can enter.
pub struct Netd {
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Netd {
    pub fn start(ns: &Netns, upstream_dns: &[&str]) -> Netd {
        operators_group();
        let dir = tempfile::Builder::new()
            .prefix("bqd")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("netd.sock");
        let state = dir.path().join("netd");
        let log = dir.path().join("netd.log");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name, "setpriv", "--bounding-set"])
            .arg(unit_bounding_set())
            .args(["--", env!("CARGO_BIN_EXE_boma-qvm"), "netd"])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state);
        for d in upstream_dns {
            c.args(["--upstream-dns", d]);
        }
        let child = c
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("netd.err")).unwrap())
            .spawn()
            .unwrap();
        let netd = Netd {
            socket,
            state,
            log: dir.path().join("netd.err"),
            child: Some(child),
            _dir: dir,
        };
        for _ in 0..100 {
            if netd.socket.exists() {
                return netd;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("netd did not come up:\n{}", netd.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn socket_env(&self) -> String {
        self.socket.display().to_string()
    }

    /// SIGTERM and wait; its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        c.wait().ok()
    }
}

impl Drop for Netd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A finished command's text (stdout, stderr).
pub fn out(o: &Output) -> String {
    super::text(o)
}

/// The capability bounding set the role's netd unit gives it, as `setpriv --bounding-set` takes
/// it (`-all,+net_admin,...`): tests run netd under exactly that set, so a capability the unit
/// lacks fails them.
pub fn unit_bounding_set() -> String {
    let unit = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/roles/integration_test/templates/boma-qvm-netd.service.j2"
    );
    let text = std::fs::read_to_string(unit).unwrap();
    let caps = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap_or_else(|| panic!("{unit} has no CapabilityBoundingSet="));
    let mut set = String::from("-all");
    for cap in caps.split_whitespace() {
        set.push_str(",+");
        set.push_str(&cap.trim_start_matches("CAP_").to_lowercase());
    }
    set
}
