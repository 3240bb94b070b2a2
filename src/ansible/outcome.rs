//! What a playbook run is and how it ended.

use super::output::{Recap, TaskFailure};
use super::safety::ScopeReport;
use crate::error::{Error, Result, show};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Playbook {
    /// The repo's `site.yml`: the real apply.
    Site,
    /// The repo's `tests/integration/verify.yml`: the outcome checks.
    Verify,
}

impl Playbook {
    pub fn name(self) -> &'static str {
        match self {
            Playbook::Site => "site.yml",
            Playbook::Verify => "verify.yml",
        }
    }

    /// Generous under TCG: an apply is minutes, a verify after boot up to ~5 (it waits for boot).
    pub fn default_timeout(self) -> Duration {
        match self {
            Playbook::Site => Duration::from_secs(30 * 60),
            Playbook::Verify => Duration::from_secs(10 * 60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The log file (Ansible's output, colour stripped, secrets scrubbed).
    pub log: PathBuf,
    pub timeout: Duration,
    /// Also stream the output to this process's stdout.
    pub echo: bool,
}

/// How one playbook run ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlaybookOutcome {
    pub playbook: Playbook,
    pub success: bool,
    pub exit_code: Option<i32>,
    pub recap: Option<Recap>,
    pub failures: Vec<TaskFailure>,
    pub log: PathBuf,
    pub elapsed: Duration,
    pub scope: ScopeReport,
    /// The run was confined to the VM network and loopback (ADR-026).
    pub confined: bool,
}

impl PlaybookOutcome {
    /// One line per failure, for the terminal and the report.
    pub fn summary(&self) -> String {
        if self.success {
            return format!(
                "{} passed in {:.0}s",
                self.playbook.name(),
                self.elapsed.as_secs_f64()
            );
        }
        let mut s = format!(
            "{} failed (exit {:?}) after {:.0}s",
            self.playbook.name(),
            self.exit_code,
            self.elapsed.as_secs_f64()
        );
        for f in &self.failures {
            s.push_str(&format!("\n  - [{}] {}", f.task, f.message));
            if self.confined && crate::net::confine::is_confinement_refusal(&f.message) {
                s.push_str(&format!("\n    why: {}", crate::net::confine::WHY));
            }
        }
        s.push_str(&format!("\n  log: {}", show(&self.log)));
        s
    }

    /// `Ok(self)` on success; a failed verify is `Error::VerifyFailed`, a failed apply `Error::Ansible`.
    pub fn into_result(self) -> Result<Self> {
        if self.success {
            return Ok(self);
        }
        let host = &self.scope.host;
        if self.failures.iter().any(|f| f.unreachable)
            || self.recap.is_some_and(|r| r.unreachable > 0)
        {
            let what = format!(
                "`{host}` ({}) became unreachable over SSH during {}: after a reboot this is the \
                 incident signature (no SSH after reboot); read the console log\n{}",
                self.scope.address,
                self.playbook.name(),
                self.summary()
            );
            return Err(match self.playbook {
                Playbook::Verify => Error::verify_failed(
                    what,
                    format!(
                        "the VM is kept: `boma-qvm console {host} --log` shows why SSH is gone"
                    ),
                ),
                Playbook::Site => {
                    Error::ansible(what, "inspect the kept VM's console (boma-qvm console)")
                }
            });
        }
        Err(match self.playbook {
            Playbook::Verify => Error::verify_failed(
                self.summary(),
                format!(
                    "the VM is kept: inspect it (`boma-qvm ssh {host}`), fix the change under test, \
                     then `boma-qvm verify {host}` (or run the cycle again)"
                ),
            ),
            Playbook::Site => Error::ansible(
                self.summary(),
                format!(
                    "the VM is kept: inspect it (boma-qvm ssh {host}), fix the role, re-run the apply"
                ),
            ),
        })
    }
}
