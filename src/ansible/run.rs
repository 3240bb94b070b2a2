//! A session: one profile, one VM, the files Ansible reads, and the playbook runs.
//!
//! The session directory (e.g. `<vm run dir>/ansible/`) holds:
//! - `inventory/hosts.json` (+ `group_vars`/`host_vars` links): the transient inventory
//! - `certs.json`, `connection.json`: extra-vars files (see `vars` for the layering order)
//! - `secrets.json`: only while a playbook runs, mode 0600
//! - `verify/verify.yml`: a wrapper that imports the repo's verify playbook, next to links to the
//!   repo's playbook-level `group_vars`/`host_vars`, so verify sees the vars the apply saw
//!   (Ansible loads playbook-adjacent vars from the top playbook's directory only, and
//!   `tests/integration/` is not the repo root).

use super::certs::CertPlan;
use super::inventory::{self, TransientInventory};
use super::output::{Recap, TaskFailure, parse_failures, parse_recap};
use super::safety::{self, ScopeReport, Subnet};
use super::vars::Connection;
use super::{Profile, base_env, find_tool, tee};
use crate::error::{Error, IoContext, Result, show};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
pub struct SessionConfig {
    /// Where the session's files go (created; a previous session's files are replaced).
    pub dir: PathBuf,
    pub target: Connection,
    /// The isolated subnet the VM's address must be in.
    pub subnet: Subnet,
    pub certs: CertPlan,
    /// The user's own `-e` values (`k=v`, `@file` or JSON), layered after the cert tier.
    pub extra_vars: Vec<String>,
    /// Run every Ansible command inside this network namespace (`ip netns exec NS`), for a VM
    /// that is only reachable there.
    pub netns: Option<String>,
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
}

impl PlaybookOutcome {
    /// One line per failure, for the terminal and the report.
    pub fn summary(&self) -> String {
        if self.success {
            return format!("{} passed in {:.0}s", self.playbook.name(), self.elapsed.as_secs_f64());
        }
        let mut s = format!(
            "{} failed (exit {:?}) after {:.0}s",
            self.playbook.name(),
            self.exit_code,
            self.elapsed.as_secs_f64()
        );
        for f in &self.failures {
            s.push_str(&format!("\n  - [{}] {}", f.task, f.message));
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
        if self.failures.iter().any(|f| f.unreachable) || self.recap.is_some_and(|r| r.unreachable > 0) {
            let what = format!(
                "`{host}` ({}) became unreachable over SSH during {}: after a reboot this is the \
                 incident signature (no SSH after reboot); read the console log\n{}",
                self.scope.address,
                self.playbook.name(),
                self.summary()
            );
            return Err(match self.playbook {
                Playbook::Verify => Error::VerifyFailed(what),
                Playbook::Site => Error::ansible(what, "inspect the kept VM's console (boma-qvm console)"),
            });
        }
        Err(match self.playbook {
            Playbook::Verify => Error::VerifyFailed(self.summary()),
            Playbook::Site => Error::ansible(
                self.summary(),
                format!("the VM is kept: inspect it (boma-qvm ssh {host}), fix the role, re-run the apply"),
            ),
        })
    }
}

pub struct Session {
    profile: Profile,
    cfg: SessionConfig,
    inventory: TransientInventory,
    verify_wrapper: PathBuf,
}

impl Session {
    /// Write the transient inventory and the vars files. Runs nothing yet.
    pub fn new(profile: Profile, cfg: SessionConfig) -> Result<Session> {
        std::fs::create_dir_all(&cfg.dir).ctx(|| format!("creating {}", show(&cfg.dir)))?;
        let t = inventory::build(&profile.export, &profile.host, &cfg.target.inventory_vars())?;
        let inventory = inventory::write(&cfg.dir.join("inventory"), &t, &profile.inventories)?;
        if !inventory.stripped.is_empty() {
            tracing::info!(stripped = ?inventory.stripped, "connection vars of the real host left out of the transient inventory");
        }
        write_json(&cfg.dir.join("certs.json"), &serde_json::Value::Object(cfg.certs.vars.clone()))?;
        write_json(&cfg.dir.join("connection.json"), &serde_json::Value::Object(cfg.target.extra_vars()))?;
        let verify_wrapper = write_verify_wrapper(&cfg.dir.join("verify"), &profile)?;
        Ok(Session { profile, cfg, inventory, verify_wrapper })
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The transient inventory file.
    pub fn inventory(&self) -> &Path {
        &self.inventory.path
    }

    /// Text for the report when the cert tier carries an accepted risk.
    pub fn accepted_risk(&self) -> Option<&str> {
        self.cfg.certs.accepted_risk.as_deref()
    }

    fn playbook(&self, pb: Playbook) -> (PathBuf, PathBuf) {
        match pb {
            Playbook::Site => {
                let dir = self.profile.site.parent().map(Path::to_path_buf).unwrap_or_default();
                (self.profile.site.clone(), dir)
            }
            Playbook::Verify => (self.verify_wrapper.clone(), self.cfg.dir.join("verify")),
        }
    }

    fn secrets_path(&self) -> PathBuf {
        self.cfg.dir.join("secrets.json")
    }

    /// The `-e` arguments, in the documented order (see `vars`).
    pub fn extra_var_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut at = |p: &Path| {
            args.push("-e".into());
            args.push(format!("@{}", p.display()).into());
        };
        at(&self.profile.overlay);
        at(&self.cfg.dir.join("certs.json"));
        if self.cfg.certs.secret.is_some() {
            at(&self.secrets_path());
        }
        for e in &self.cfg.extra_vars {
            args.push("-e".into());
            args.push(e.into());
        }
        args.push("-e".into());
        args.push(format!("@{}", self.cfg.dir.join("connection.json").display()).into());
        args
    }

    /// `ansible-playbook` arguments for `pb` (no secret is ever on it: the credential is a file).
    pub fn playbook_args(&self, pb: Playbook) -> Vec<OsString> {
        let (path, _) = self.playbook(pb);
        let mut args: Vec<OsString> = vec![path.into(), "-i".into(), self.inventory.path.clone().into()];
        args.extend(["--limit".into(), self.profile.host.clone().into()]);
        args.extend(self.extra_var_args());
        args
    }

    fn command(&self, program: &str, args: &[OsString], pb: Playbook) -> Result<tokio::process::Command> {
        let prog = find_tool(program)?;
        let mut cmd = match &self.cfg.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns.as_str()]).arg(&prog);
                c
            }
            None => tokio::process::Command::new(&prog),
        };
        cmd.args(args).current_dir(&self.profile.repo).envs(base_env());
        if pb == Playbook::Verify {
            // Also load vars next to the repo's verify playbook (the wrapper is the top one).
            cmd.env("ANSIBLE_PLAYBOOK_VARS_ROOT", "all");
        }
        Ok(cmd)
    }

    /// Ask Ansible who is in scope and where it would connect; refuse unless it is exactly HOST,
    /// over ssh, at an address inside the isolated subnet.
    pub async fn check_scope(&self, pb: Playbook) -> Result<ScopeReport> {
        let _secret = self.write_secret()?;
        self.scope(pb).await
    }

    async fn scope(&self, pb: Playbook) -> Result<ScopeReport> {
        let (path, pbdir) = self.playbook(pb);
        let tree = tempfile::Builder::new()
            .prefix("scope-")
            .tempdir_in(&self.cfg.dir)
            .ctx(|| "creating a scope dir".into())?;
        let mut args: Vec<OsString> = vec!["all".into(), "-i".into(), self.inventory.path.clone().into()];
        args.extend(["--playbook-dir".into(), pbdir.into()]);
        args.extend(self.extra_var_args());
        args.extend(["-m".into(), "ansible.builtin.debug".into(), "-a".into(), safety::PROBE_MSG.into()]);
        args.extend(["--tree".into(), tree.path().into()]);
        self.quick("ansible", &args, pb).await?;
        let mut results = BTreeMap::new();
        for entry in std::fs::read_dir(tree.path()).ctx(|| "reading the scope results".into())? {
            let entry = entry.ctx(|| "reading the scope results".into())?;
            let text =
                std::fs::read_to_string(entry.path()).ctx(|| format!("reading {}", show(&entry.path())))?;
            let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
            results.insert(entry.file_name().to_string_lossy().into_owned(), value);
        }
        let (address, connection) = safety::judge_inventory(&results, &self.profile.host, self.cfg.subnet)?;

        let mut args = self.playbook_args(pb);
        args.push("--list-hosts".into());
        let listed = self.quick("ansible-playbook", &args, pb).await?;
        safety::judge_playbook(&safety::parse_list_hosts(&listed), &self.profile.host, &show(&path))?;
        let report = ScopeReport {
            host: self.profile.host.clone(),
            address,
            connection,
            subnet: self.cfg.subnet.to_string(),
            playbook: show(&path),
        };
        tracing::info!(host = %report.host, address = %report.address, subnet = %report.subnet, "scope checked: one host, on the isolated subnet");
        Ok(report)
    }

    /// A short Ansible command whose stdout we need; failure is an error.
    async fn quick(&self, program: &str, args: &[OsString], pb: Playbook) -> Result<String> {
        let mut cmd = self.command(program, args, pb)?;
        cmd.env("ANSIBLE_NOCOLOR", "1").stdin(std::process::Stdio::null()).kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
            .await
            .map_err(|_| Error::timeout(format!("`{program}` (scope check)"), 180, ""))?
            .ctx(|| format!("running {program}"))?;
        if !out.status.success() {
            return Err(Error::ansible(
                format!(
                    "`{program}` failed while checking the scope: {}{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    String::from_utf8_lossy(&out.stdout).trim()
                ),
                format!("check the transient inventory {} and the overlay", show(&self.inventory.path)),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Check the scope, then run `pb` limited to HOST, streaming to the terminal and `opts.log`.
    /// A playbook that fails is `Ok` with `success: false` (see `PlaybookOutcome::into_result`);
    /// errors are for runs that could not happen (missing tool, refused scope, timeout).
    pub async fn run_playbook(&self, pb: Playbook, opts: &RunOptions) -> Result<PlaybookOutcome> {
        let _secret = self.write_secret()?;
        let scope = self.scope(pb).await?;
        let cp = tempfile::Builder::new()
            .prefix("bqa-")
            .tempdir_in("/tmp")
            .ctx(|| "creating an ssh control dir".into())?;
        let args = self.playbook_args(pb);
        let mut cmd = self.command("ansible-playbook", &args, pb)?;
        cmd.env("ANSIBLE_FORCE_COLOR", "1")
            .env("ANSIBLE_STDOUT_CALLBACK", "default")
            .env("ANSIBLE_PIPELINING", "True")
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", cp.path());
        let line = args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
        let header = format!("# boma-qvm: ansible-playbook {line}\n# scope: {scope:?}");
        let secrets: Vec<String> = self.cfg.certs.secret.iter().map(|s| s.value.clone()).collect();
        tracing::info!(playbook = pb.name(), log = %show(&opts.log), "running ansible-playbook");
        let started = Instant::now();
        let teed = tee::run(
            cmd,
            &format!("ansible-playbook {}", pb.name()),
            &opts.log,
            &header,
            opts.echo,
            opts.timeout,
            &secrets,
        )
        .await;
        close_masters(cp.path()).await;
        let teed = teed?;
        let elapsed = started.elapsed();
        let outcome = PlaybookOutcome {
            playbook: pb,
            success: teed.status.success(),
            exit_code: teed.status.code(),
            recap: parse_recap(&teed.lines, &self.profile.host),
            failures: parse_failures(&teed.lines),
            log: opts.log.clone(),
            elapsed,
            scope,
        };
        tracing::info!(
            playbook = pb.name(),
            success = outcome.success,
            elapsed_s = elapsed.as_secs_f64(),
            "ansible-playbook finished"
        );
        Ok(outcome)
    }

    /// The credential file for the duration of a run (0600, removed when the guard drops).
    fn write_secret(&self) -> Result<Option<SecretFile>> {
        let Some(secret) = &self.cfg.certs.secret else {
            return Ok(None);
        };
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.secrets_path();
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .ctx(|| format!("creating {}", show(&path)))?;
        let body = serde_json::json!({ secret.var.clone(): secret.value });
        f.write_all(body.to_string().as_bytes()).ctx(|| format!("writing {}", show(&path)))?;
        Ok(Some(SecretFile(path)))
    }
}

/// Removes the credential file on drop.
struct SecretFile(PathBuf);

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("a JSON value serializes");
    std::fs::write(path, text + "\n").ctx(|| format!("writing {}", show(path)))
}

fn write_verify_wrapper(dir: &Path, profile: &Profile) -> Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).ctx(|| format!("removing {}", show(dir)))?;
    }
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", show(dir)))?;
    let site_dir = profile.site.parent().unwrap_or(&profile.repo);
    for sub in ["group_vars", "host_vars"] {
        let target = site_dir.join(sub);
        if target.is_dir() {
            std::os::unix::fs::symlink(&target, dir.join(sub))
                .ctx(|| format!("linking {}", show(&target)))?;
        }
    }
    let path = dir.join("verify.yml");
    let body = format!(
        "# Written by boma-qvm: the repo's verify playbook, with the vars the apply saw.\n- import_playbook: {}\n",
        serde_json::Value::String(show(&profile.verify))
    );
    std::fs::write(&path, body).ctx(|| format!("writing {}", show(&path)))?;
    Ok(path)
}

/// End the ssh ControlPersist masters a run left (they would otherwise linger up to a minute).
async fn close_masters(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let _ = tokio::process::Command::new("ssh")
            .arg("-o")
            .arg(format!("ControlPath={}", path.display()))
            .args(["-O", "exit", "boma-qvm-vm"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await;
    }
}
