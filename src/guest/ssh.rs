//! SSH to the guest with the per-VM key pair: key generation, the ssh argv, remote commands with a
//! hard timeout, waiting for the first login, and the interactive `boma-qvm ssh`.
//!
//! Every remote call has a timeout: a guest that panics leaves an SSH session hanging forever.
//! The options make ssh deterministic and non-interactive: no user `~/.ssh/config` (`-F /dev/null`),
//! only our key, no host-key prompts or known_hosts writes (every VM is new), no password
//! prompts (`BatchMode`), and keep-alives so a dead guest drops an open session within ~15 s.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result, show};

/// The admin user the seed creates and Ansible logs in as.
pub const USER: &str = "ansible";
pub const KEY: &str = "id_ed25519";
const SSH_FIX: &str = "apt-get install openssh-client";

/// A per-VM ed25519 key pair in the VM's run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub private: PathBuf,
    pub public: PathBuf,
    /// The public key line (`ssh-ed25519 AAAA... boma-qvm@<dir>`), for the seed.
    pub public_key: String,
}

/// Generate `dir/id_ed25519` (+ `.pub`) with `ssh-keygen -t ed25519 -N ''`, or reuse the pair
/// already there (re-deriving a missing `.pub`).
pub fn keygen(dir: &Path) -> Result<KeyPair> {
    use std::os::unix::fs::PermissionsExt;
    crate::tools::require("ssh-keygen", SSH_FIX)?;
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", show(dir)))?;
    let private = dir.join(KEY);
    let public = dir.join(format!("{KEY}.pub"));
    if private.exists() {
        if !public.exists() {
            let out = crate::tools::run(
                std::process::Command::new("ssh-keygen")
                    .arg("-y")
                    .arg("-f")
                    .arg(&private),
            )?;
            std::fs::write(&public, &out.stdout).ctx(|| format!("writing {}", show(&public)))?;
        }
    } else {
        let _ = std::fs::remove_file(&public);
        let comment = format!(
            "boma-qvm@{}",
            dir.file_name().unwrap_or_default().to_string_lossy()
        );
        crate::tools::run(
            std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", &comment, "-f"])
                .arg(&private),
        )?;
    }
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))
        .ctx(|| format!("chmod 600 {}", show(&private)))?;
    let public_key = std::fs::read_to_string(&public)
        .ctx(|| format!("reading {}", show(&public)))?
        .trim()
        .to_string();
    Ok(KeyPair {
        private,
        public,
        public_key,
    })
}

/// Where and how to reach a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key: PathBuf,
    /// TCP connect timeout (ssh `ConnectTimeout`).
    pub connect_timeout: Duration,
}

impl Conn {
    /// `ansible@host:22` with `key`, 10 s connect timeout.
    pub fn new(host: impl Into<String>, key: impl Into<PathBuf>) -> Self {
        Conn {
            host: host.into(),
            port: 22,
            user: USER.into(),
            key: key.into(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// `ssh <options> -p PORT user@host` (no remote command).
    pub fn argv(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "ssh".into(),
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            show(&self.key),
        ];
        for o in [
            "IdentitiesOnly=yes".to_string(),
            "StrictHostKeyChecking=no".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "LogLevel=ERROR".into(),
            "BatchMode=yes".into(),
            format!("ConnectTimeout={}", self.connect_timeout.as_secs().max(1)),
            "ServerAliveInterval=5".into(),
            "ServerAliveCountMax=3".into(),
        ] {
            v.push("-o".into());
            v.push(o);
        }
        v.extend([
            "-p".into(),
            self.port.to_string(),
            format!("{}@{}", self.user, self.host),
        ]);
        v
    }

    /// The argv running `cmd` (a shell command line) on the guest.
    pub fn command(&self, cmd: &str) -> Vec<String> {
        let mut v = self.argv();
        v.extend(["--".into(), cmd.into()]);
        v
    }

    fn target(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }
}

/// Run `cmd` on the guest, killing ssh after `timeout`. Returns the output whatever the exit
/// status (255 means ssh itself failed); see [`run_ok`] for a checked variant.
pub async fn run(conn: &Conn, cmd: &str, timeout: Duration) -> Result<Output> {
    crate::tools::require("ssh", SSH_FIX)?;
    let argv = conn.command(cmd);
    let child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(timeout, child).await {
        Ok(out) => out.ctx(|| format!("running ssh to {}", conn.target())),
        Err(_) => Err(Error::timeout(
            format!("`{cmd}` over ssh to {}", conn.target()),
            timeout.as_secs(),
            "",
        )),
    }
}

/// [`run`], and fail with `Error::Command` unless `cmd` exited 0; returns its stdout.
pub async fn run_ok(conn: &Conn, cmd: &str, timeout: Duration) -> Result<String> {
    let out = run(conn, cmd, timeout).await?;
    if !out.status.success() {
        return Err(Error::Command {
            fix: crate::error::COMMAND_FIX.into(),
            cmd: format!("ssh {} -- {cmd}", conn.target()),
            status: out.status.to_string(),
            stderr: crate::tools::tail(&out.stderr, 2000),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run `cmd`, retrying while ssh itself fails (exit 255: refused, reset, sshd restarting) until
/// `timeout`; returns the output of the first attempt in which the remote command ran, whatever
/// its exit status. The timeout error carries ssh's last complaint.
pub async fn run_retrying(
    conn: &Conn,
    cmd: &str,
    per_try: Duration,
    timeout: Duration,
) -> Result<Output> {
    let start = Instant::now();
    let mut last = String::from("no attempt finished");
    while start.elapsed() < timeout {
        let left = timeout.saturating_sub(start.elapsed());
        match run(conn, cmd, per_try.min(left)).await {
            Ok(out) if out.status.code() != Some(255) => return Ok(out),
            Ok(out) => last = crate::tools::tail(&out.stderr, 500),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_secs(2).min(timeout.saturating_sub(start.elapsed())))
            .await;
    }
    Err(Error::timeout(
        format!("`{cmd}` over ssh as {}", conn.target()),
        timeout.as_secs(),
        format!("\n  last ssh error: {last}"),
    ))
}

/// Retry a trivial login until it works or `timeout` passes.
pub async fn wait_for_login(conn: &Conn, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let per_try = conn.connect_timeout + Duration::from_secs(20);
    let out = run_retrying(conn, "true", per_try, timeout).await?;
    if !out.status.success() {
        return Err(Error::Command {
            fix: crate::error::COMMAND_FIX.into(),
            cmd: format!("ssh {} -- true", conn.target()),
            status: out.status.to_string(),
            stderr: crate::tools::tail(&out.stderr, 500),
        });
    }
    tracing::info!(
        secs = format!("{:.1}", start.elapsed().as_secs_f64()),
        "SSH login to {} works",
        conn.target()
    );
    Ok(())
}

/// Replace this process with an interactive `ssh` (a shell, or `cmd` when given; a TTY is
/// requested when stdin is one). Only returns on failure to exec.
pub fn exec_shell(conn: &Conn, cmd: Option<&[String]>) -> Result<std::convert::Infallible> {
    use std::io::IsTerminal;
    use std::os::unix::process::CommandExt;
    crate::tools::require("ssh", SSH_FIX)?;
    let mut argv = conn.argv();
    let target = argv.pop().expect("argv ends with the target");
    argv.push(if std::io::stdin().is_terminal() {
        "-t".into()
    } else {
        "-T".into()
    });
    argv.push(target);
    if let Some(cmd) = cmd.filter(|c| !c.is_empty()) {
        argv.push("--".into());
        argv.extend(cmd.iter().cloned());
    }
    let err = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
    Err(Error::Io {
        context: "starting ssh".into(),
        source: err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_has_key_user_port_and_safety_options() {
        let c = Conn::new("192.0.2.7", "/run/vm/id_ed25519").with_port(2222);
        let v = c.command("cloud-init status --wait");
        let s = v.join(" ");
        for want in [
            "-i /run/vm/id_ed25519",
            "-o StrictHostKeyChecking=no",
            "-o UserKnownHostsFile=/dev/null",
            "-o BatchMode=yes",
            "-o ConnectTimeout=10",
            "-p 2222 ansible@192.0.2.7 -- cloud-init status --wait",
        ] {
            assert!(s.contains(want), "{want} missing from {s}");
        }
        assert_eq!(v[0], "ssh");
    }

    #[test]
    fn keygen_makes_an_ed25519_pair_and_reuses_it() {
        let d = tempfile::tempdir().unwrap();
        let k = keygen(d.path()).unwrap();
        assert!(
            k.public_key.starts_with("ssh-ed25519 AAAA"),
            "{}",
            k.public_key
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&k.private).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::remove_file(&k.public).unwrap();
        assert_eq!(
            keygen(d.path())
                .unwrap()
                .public_key
                .split_whitespace()
                .nth(1),
            k.public_key.split_whitespace().nth(1)
        );
    }

    #[tokio::test]
    async fn run_times_out_instead_of_hanging() {
        // A listener that accepts and never speaks: ssh waits for the banner until killed.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = vec![];
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let c = Conn::new("127.0.0.1", "/nonexistent-key").with_port(port);
        let err = run(&c, "true", Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        let err = wait_for_login(&c, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        hold.abort();
    }
}
