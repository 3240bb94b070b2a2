//! Is the guest up, and can we get in? The evidence a lockout is called with.
//!
//! The guest says when its boot is done: on the console (cloud-init's final stage, a getty's
//! login prompt, systemd reaching its default target; the supervisor's console watcher records
//! them as `BOOT_DONE`) and through the guest agent (`systemctl is-system-running` is `running` or
//! `degraded`). SSH that has not answered [`LOCKOUT_GRACE`] after that is a lockout, called with
//! what SSH does (refused, filtered, login refused) and what shows the guest is alive.

use super::Machine;
use super::events::{self, Record, Source, Tail, names};
use crate::guest::ssh;
use crate::{Error, Result};
use serde_json::json;
use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long SSH gets once the guest has said its boot is done. A lockout is called within
/// this plus [`PROBE`] of the signal (well under 30 s).
pub const LOCKOUT_GRACE: Duration = Duration::from_secs(20);
/// Bound on each probe of the lockout evidence (TCP to port 22, the agent).
const PROBE: Duration = Duration::from_secs(5);

/// What said the boot is done, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct BootDone {
    /// "getty login prompt", "cloud-init final stage finished", "systemd reached its default
    /// target", "guest agent: systemd running".
    pub signal: String,
    /// The console line (or the agent's answer).
    pub line: String,
    /// Seconds since the Unix epoch.
    pub at: f64,
}

/// What SSH does, from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshState {
    /// A login works.
    Works,
    /// Port 22 accepts TCP but the login fails (sshd up; keys, users or sshd config broken).
    LoginFails(String),
    /// Connections are refused: nothing listens on port 22 (or a firewall rejects them).
    Refused,
    /// Connections time out: a firewall drops them (or the guest's network is down).
    Filtered,
    /// No route or no ARP answer: the guest's network is down.
    Unreachable(String),
}

impl SshState {
    pub fn describe(&self) -> String {
        match self {
            SshState::Works => "works".into(),
            SshState::LoginFails(e) => format!(
                "port 22 accepts TCP connections but the login fails ({e}): sshd runs, its \
                 config, keys or users are broken"
            ),
            SshState::Refused => "refused: nothing listens on port 22, or a firewall rejects \
                                  the connections"
                .into(),
            SshState::Filtered => "filtered: TCP connections to port 22 time out (a firewall \
                                   drops them)"
                .into(),
            SshState::Unreachable(e) => format!("unreachable ({e}): the guest's network is down"),
        }
    }

    /// `refused`, `filtered`, `login-fails`, `unreachable`, `works`: for reports and tests.
    pub fn key(&self) -> &'static str {
        match self {
            SshState::Works => "works",
            SshState::LoginFails(_) => "login-fails",
            SshState::Refused => "refused",
            SshState::Filtered => "filtered",
            SshState::Unreachable(_) => "unreachable",
        }
    }
}

impl Machine {
    /// Wait until the guest says its boot is done: a `BOOT_DONE` console record after a RESET
    /// (`tail` must start before the reset; `after_reset: false` when it starts after it), or the
    /// guest agent reporting systemd `running`/`degraded`. Fails fast on a console failure or
    /// QEMU exiting; `Error::Timeout` after `timeout`.
    pub async fn wait_boot_done(
        &self,
        mut tail: Tail,
        after_reset: bool,
        timeout: Duration,
    ) -> Result<BootDone> {
        let reset_seen = Cell::new(after_reset);
        let console = async {
            let r = tail
                .wait_for("the guest to say its boot is done", timeout, |r| {
                    if r.is(names::RESET) {
                        reset_seen.set(true);
                    }
                    reset_seen.get() && r.is(names::BOOT_DONE)
                })
                .await?;
            Ok::<_, Error>(BootDone {
                signal: r.data["signal"].as_str().unwrap_or("console").to_string(),
                line: r.data["line"].as_str().unwrap_or("").to_string(),
                at: r.ts,
            })
        };
        let agent = async {
            // Give the previous boot's agent no chance to answer for this one.
            tokio::time::sleep(Duration::from_secs(5)).await;
            loop {
                if let Ok(state) = self.system_state(PROBE).await
                    && matches!(state.as_str(), "running" | "degraded")
                {
                    return BootDone {
                        signal: "guest agent: systemd running".into(),
                        line: format!("systemctl is-system-running: {state}"),
                        at: events::now(),
                    };
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        };
        tokio::select! {
            r = console => r,
            b = agent => Ok(b),
        }
    }

    /// `systemctl is-system-running` through the guest agent (`running`, `degraded`,
    /// `starting`, ...), or why the agent did not answer.
    pub async fn system_state(&self, within: Duration) -> Result<String> {
        let argv = ["/bin/systemctl", "is-system-running"];
        match tokio::time::timeout(within, self.agent_exec(&argv, within)).await {
            Ok(r) => r.map(|o| o.stdout.trim().to_string()),
            Err(_) => Err(Error::timeout(
                "the guest agent",
                within.as_secs(),
                " (it does not answer)",
            )),
        }
    }

    /// What SSH does right now: a TCP connect to port 22 (refused / timing out / unreachable),
    /// then, if it connects, a login.
    pub async fn probe_ssh(&self) -> SshState {
        let Ok(ip) = self.ip() else {
            return SshState::Unreachable("no address on the isolated network".into());
        };
        let addr = SocketAddr::from((ip, 22));
        match tokio::time::timeout(PROBE, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => return SshState::Filtered,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return SshState::Refused;
            }
            Ok(Err(e)) => return SshState::Unreachable(e.to_string()),
            Ok(Ok(_)) => {}
        }
        let Ok(conn) = self.conn() else {
            return SshState::LoginFails("no SSH key for this VM".into());
        };
        // The port answers: a slow sshd (a busy TCG guest) gets some more tries at a login
        // before it counts as broken.
        match ssh::wait_for_login(&conn, LOCKOUT_GRACE).await {
            Ok(()) => SshState::Works,
            Err(e) => SshState::LoginFails(
                e.inner()
                    .to_string()
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty() && !l.contains("fix:"))
                    .unwrap_or("the login fails")
                    .trim()
                    .to_string(),
            ),
        }
    }

    /// The lockout `after` ("after the reboot", "after the apply"), with its evidence: the boot
    /// done signal (if one came), what SSH does, what the agent says, the console tail. `None`
    /// when SSH works after all. Recorded as a `LOCKOUT` event.
    pub async fn lockout(&self, after: &str, boot_done: Option<&BootDone>) -> Option<Error> {
        let (ssh_state, agent) = tokio::join!(self.probe_ssh(), self.system_state(PROBE));
        if ssh_state == SshState::Works {
            return None;
        }
        let now = events::now();
        let alive = match &agent {
            Ok(s) => format!("the guest agent answers (systemd: {s})"),
            Err(_) => "the guest agent does not answer".to_string(),
        };
        let boot = match boot_done {
            Some(b) => format!(
                "its boot finished {:.0}s ago ({}: `{}`)",
                now - b.at,
                b.signal,
                b.line.chars().take(120).collect::<String>()
            ),
            None => "it has not said its boot is done".to_string(),
        };
        let ip = self.ip().map(|i| i.to_string()).unwrap_or_default();
        let state = if boot_done.is_some() || agent.is_ok() {
            "while the guest is alive"
        } else {
            "and the guest shows no sign of a finished boot (does it hang in its boot?)"
        };
        let problem = format!(
            "no SSH {after}, {state}: {boot}; {alive}; SSH to {ip}:22 is {}",
            ssh_state.describe()
        );
        let _ = events::append(
            &self.vm.run.events(),
            &Record::new(
                Source::Boma,
                names::LOCKOUT,
                json!({
                    "after": after,
                    "ssh": ssh_state.key(),
                    "signal": boot_done.map(|b| b.signal.clone()),
                    "boot_done_at": boot_done.map(|b| b.at),
                    "seconds_after_boot_done": boot_done.map(|b| now - b.at),
                    "agent": agent.as_ref().ok(),
                }),
            ),
        );
        let host = self.host();
        Some(self.vm.explain(Error::Lockout {
            problem,
            fix: format!(
                "this is the incident signature: the change locks SSH out {after}. The VM is \
                 kept: `boma-qvm console {host}` shows the guest, `boma-qvm diff {host}` what \
                 changed since the apply, and the run directory holds its state read without SSH"
            ),
        }))
    }

    /// Wait up to `cap` for SSH logins to work again after a reset, and call a lockout
    /// [`LOCKOUT_GRACE`] after the guest says its boot is done (or at `cap`). `tail` must start
    /// before the reset.
    pub(crate) async fn ssh_back_or_lockout(
        &self,
        conn: &ssh::Conn,
        tail: Tail,
        cap: Duration,
    ) -> Result<()> {
        let started = Instant::now();
        let login = ssh::wait_for_login(conn, cap);
        let done_then_grace = async {
            let done = self.wait_boot_done(tail, false, cap).await?;
            tracing::info!(
                "{}: boot done ({}: {}); SSH gets {}s more",
                self.vm.name,
                done.signal,
                done.line,
                LOCKOUT_GRACE.as_secs()
            );
            tokio::time::sleep(LOCKOUT_GRACE).await;
            Ok::<_, Error>(done)
        };
        let done = tokio::select! {
            r = login => match r {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.inner(), Error::Timeout { .. }) => None,
                Err(e) => return Err(e),
            },
            d = done_then_grace => match d {
                Ok(d) => Some(d),
                Err(e) if matches!(e.inner(), Error::Timeout { .. }) => None,
                Err(e) => return Err(e),
            },
        };
        match self.lockout("after the reboot", done.as_ref()).await {
            None => {
                tracing::info!(
                    "{}: SSH answered at the last probe, {:.0}s after the reset",
                    self.vm.name,
                    started.elapsed().as_secs_f64()
                );
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}
