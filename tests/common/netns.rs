//! Network namespaces for tests: created with a unique name, torn down in Drop (processes inside
//! killed, namespace deleted) even when the test panics. Library code runs inside one through
//! `Netns::run` (a fresh thread `setns`'d into it, with its own current-thread tokio runtime);
//! helper processes through `ip netns exec`.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Prefix of every namespace these tests create (`bqn-<pid>-<n>-<tag>`).
pub const PREFIX: &str = "bqn-";

pub struct Netns {
    pub name: String,
    children: Vec<Child>,
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("sh runs")
}

/// Run a shell command; panic with its output when it fails.
pub fn sh_ok(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ns_ino(path: &str) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {path}: {e}"));
    (m.dev(), m.ino())
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{PREFIX}{}-{n}-{tag}", std::process::id());
        sh_ok(&format!("ip netns add {name}"));
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n <ns> <args>`, must succeed.
    pub fn ip(&self, args: &str) -> String {
        sh_ok(&format!("ip -n {} {args}", self.name))
    }

    /// A shell command inside the namespace (not checked).
    pub fn exec(&self, cmd: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .expect("ip netns exec runs")
    }

    /// A shell command inside the namespace that must succeed; returns stdout.
    pub fn exec_ok(&self, cmd: &str) -> String {
        sh_ok(&format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            cmd.replace('\'', r"'\''")
        ))
    }

    /// A background process inside the namespace, killed on Drop; returns its pid
    /// (`ip netns exec` and `sh -c exec` both exec, so it is the command's own pid).
    pub fn spawn(&mut self, cmd: &str) -> u32 {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "sh",
                "-c",
                &format!("exec {cmd}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in netns");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Run `f` on a fresh thread that has joined this namespace (only that thread; the test
    /// process stays where it is). Panics propagate.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let original = ns_ino("/proc/thread-self/ns/net");
                let file = File::open(&path).expect("open netns file");
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let here = ns_ino("/proc/thread-self/ns/net");
                assert_eq!(here, ns_ino(&path), "thread is not in {path}");
                assert_ne!(
                    here, original,
                    "refusing to run in the test process's own namespace"
                );
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Run an async block inside the namespace on a current-thread runtime.
    pub fn block_on<T: Send, F: std::future::Future<Output = T>>(
        &self,
        f: impl FnOnce() -> F + Send,
    ) -> T {
        self.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(f())
        })
    }

    /// What boma-qvm left in this namespace for the state dir `state`: links with our names
    /// (bridge, taps), our nft table, and processes whose argv mentions `state` (dnsmasq runs
    /// as `dnsmasq --conf-file=<state>/net/dnsmasq.conf`, QEMU and the supervisor under
    /// `<state>/vms/`). Empty when nothing is left.
    pub fn leftovers(&self, state: &std::path::Path) -> String {
        let mut left = Vec::new();
        let links = self.exec_ok("ip -o link show");
        left.extend(
            links
                .lines()
                .filter(|l| l.contains("boma-qvm") || l.contains(": bq-"))
                .map(str::to_string),
        );
        let tables = self.exec_ok("nft list tables");
        left.extend(
            tables
                .lines()
                .filter(|l| l.contains("boma_qvm"))
                .map(str::to_string),
        );
        for pid in self.pids() {
            let argv = boma_qvm::machine::procs::cmdline(pid);
            let in_state = boma_qvm::machine::procs::cwd(pid).is_some_and(|d| d.starts_with(state));
            if boma_qvm::machine::procs::mentions(&argv, state) || in_state {
                left.push(format!("pid {pid}: {}", argv.join(" ")));
            }
        }
        left.join("\n")
    }

    /// Pids of the processes in this namespace.
    pub fn pids(&self) -> Vec<i32> {
        let out = sh(&format!("ip netns pids {}", self.name));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything else started inside (a daemonized dnsmasq the test left behind on failure).
        let me = std::process::id() as i32;
        for _ in 0..50 {
            let pids: Vec<i32> = self.pids().into_iter().filter(|p| *p != me).collect();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}
