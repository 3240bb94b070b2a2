//! A session: one profile, one VM, the files Ansible reads, and the playbook runs.
//!
//! The session directory (e.g. `<vm run dir>/ansible/`) holds:
//! - `inventory/hosts.json` (+ `group_vars`/`host_vars` links): the transient inventory
//! - `certs.json`, `connection.json`: extra-vars files (see `vars` for the layering order)
//! - `secrets.json`: the cert tier's credential and the vars marked secret (`--secret-var`), only
//!   while a playbook (or the scope check) runs, mode 0600
//! - `site-vars/site-vars.json` (+ links to the `group_vars`/`host_vars` next to site.yml): a
//!   host-less inventory source added AFTER the transient inventory for verify runs only, so
//!   verify sees the playbook-level vars the apply saw. Ansible loads playbook-adjacent vars from
//!   the running playbook's own directory (`tests/integration/`), also through `import_playbook`
//!   (measured); as the last inventory source they keep winning over the real inventory's vars.

use super::certs::CertPlan;
use super::inventory::{self, TransientInventory};
use super::outcome::{Playbook, PlaybookOutcome, RunOptions};
use super::output::{parse_failures, parse_recap};
use super::safety::Subnet;
use super::vars::Connection;
use super::{Profile, base_env, find_tool, tee};
use crate::error::{IoContext, Result, show};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    /// Extra vars marked secret (`--secret-var`): passed in `secrets.json` with the credential,
    /// and scrubbed from every log.
    pub secret_vars: Vec<super::Secret>,
    /// Run every Ansible process confined to the VM network and loopback (a cycle always
    /// does; `None`: as they are, for library callers that set up their own isolation).
    pub confine: Option<super::Confine>,
}

/// One profile mirrored onto one VM: the transient inventory and vars files on disk, and the
/// playbook runs against it. Every run is preceded by the scope check (`check_scope`).
pub struct Session {
    pub(super) profile: Profile,
    pub(super) cfg: SessionConfig,
    pub(super) inventory: TransientInventory,
    /// The extra inventory source that carries site.yml's playbook-level vars into verify runs.
    site_vars: Option<PathBuf>,
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
        write_json(
            &cfg.dir.join("certs.json"),
            &serde_json::Value::Object(cfg.certs.vars.clone()),
        )?;
        write_json(
            &cfg.dir.join("connection.json"),
            &serde_json::Value::Object(cfg.target.extra_vars()),
        )?;
        let site_vars = write_site_vars_source(&cfg.dir.join("site-vars"), &profile)?;
        Ok(Session {
            profile,
            cfg,
            inventory,
            site_vars,
        })
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

    /// The playbook file and its directory.
    pub(super) fn playbook(&self, pb: Playbook) -> (PathBuf, PathBuf) {
        let path = match pb {
            Playbook::Site => self.profile.site.clone(),
            Playbook::Verify => self.profile.verify.clone(),
        };
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        (path, dir)
    }

    /// `-i` arguments: the transient inventory, plus site.yml's vars for verify runs.
    pub fn inventory_args(&self, pb: Playbook) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["-i".into(), self.inventory.path.clone().into()];
        if let (Playbook::Verify, Some(src)) = (pb, &self.site_vars) {
            args.extend(["-i".into(), src.clone().into()]);
        }
        args
    }

    fn secrets_path(&self) -> PathBuf {
        self.cfg.dir.join("secrets.json")
    }

    /// Every secret of the session: the vars marked secret, then the cert tier's credential.
    fn secrets(&self) -> impl Iterator<Item = &super::Secret> {
        self.cfg
            .secret_vars
            .iter()
            .chain(self.cfg.certs.secret.iter())
    }

    fn has_secrets(&self) -> bool {
        self.secrets().next().is_some()
    }

    /// Scrubs the session's secrets, and `$GANDI_API_KEY` whatever the tier (a repo can read it
    /// from the environment itself), from what the session writes.
    pub fn scrubber(&self) -> crate::secrets::Scrubber {
        crate::secrets::Scrubber::new(
            self.secrets()
                .map(|s| s.value.clone())
                .chain(super::certs::credential_in_env()),
        )
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
        if self.has_secrets() {
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
        let mut args: Vec<OsString> = vec![path.into()];
        args.extend(self.inventory_args(pb));
        args.extend(["--limit".into(), self.profile.host.clone().into()]);
        args.extend(self.extra_var_args());
        args
    }

    pub(super) fn command(
        &self,
        program: &str,
        args: &[OsString],
    ) -> Result<tokio::process::Command> {
        let prog = find_tool(program)?;
        let mut cmd = match &self.cfg.confine {
            Some(c) => {
                let (exe, wrapper) = c.wrap(&prog);
                let mut cmd = tokio::process::Command::new(exe);
                cmd.args(wrapper);
                cmd
            }
            None => tokio::process::Command::new(&prog),
        };
        cmd.args(args)
            .current_dir(&self.profile.repo)
            .envs(base_env());
        Ok(cmd)
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
        let mut cmd = self.command("ansible-playbook", &args)?;
        cmd.env("ANSIBLE_FORCE_COLOR", "1")
            .env("ANSIBLE_STDOUT_CALLBACK", "default")
            .env("ANSIBLE_PIPELINING", "True")
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", cp.path());
        let line = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let confined = match &self.cfg.confine {
            Some(c) => format!(
                "\n# confined: this run and everything it starts on the control node reach only the VM network ({}) and loopback ({})",
                self.cfg.subnet,
                match &c.netd {
                    Some(n) => format!("a veth from netd at {}", show(n)),
                    None => "a veth on this state's bridge".to_string(),
                }
            ),
            None => String::new(),
        };
        let header = format!("# boma-qvm: ansible-playbook {line}\n# scope: {scope:?}{confined}");
        let secrets = self.scrubber();
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
            confined: self.cfg.confine.is_some(),
        };
        tracing::info!(
            playbook = pb.name(),
            success = outcome.success,
            elapsed_s = elapsed.as_secs_f64(),
            "ansible-playbook finished"
        );
        Ok(outcome)
    }

    /// The secrets file for the duration of a run (0600, removed when the guard drops).
    pub(super) fn write_secret(&self) -> Result<Option<SecretFile>> {
        if !self.has_secrets() {
            return Ok(None);
        }
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
        let body: serde_json::Map<String, serde_json::Value> = self
            .secrets()
            .map(|s| (s.var.clone(), serde_json::Value::String(s.value.clone())))
            .collect();
        f.write_all(serde_json::Value::Object(body).to_string().as_bytes())
            .ctx(|| format!("writing {}", show(&path)))?;
        Ok(Some(SecretFile(path)))
    }
}

/// Removes the credential file on drop.
pub(super) struct SecretFile(PathBuf);

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("a JSON value serializes");
    std::fs::write(path, text + "\n").ctx(|| format!("writing {}", show(path)))
}

/// A host-less inventory source whose adjacent dirs are site.yml's `group_vars`/`host_vars`,
/// or `None` when verify.yml sits next to site.yml (its vars then load by themselves).
fn write_site_vars_source(dir: &Path, profile: &Profile) -> Result<Option<PathBuf>> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).ctx(|| format!("removing {}", show(dir)))?;
    }
    let site_dir = profile.site.parent().unwrap_or(&profile.repo);
    let subs: Vec<&str> = ["group_vars", "host_vars"]
        .into_iter()
        .filter(|s| site_dir.join(s).is_dir())
        .collect();
    if profile.verify.parent() == Some(site_dir) || subs.is_empty() {
        return Ok(None);
    }
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", show(dir)))?;
    for sub in subs {
        let target = site_dir.join(sub);
        std::os::unix::fs::symlink(&target, dir.join(sub))
            .ctx(|| format!("linking {}", show(&target)))?;
    }
    let path = dir.join("site-vars.json");
    std::fs::write(&path, "{\"all\": {}}\n").ctx(|| format!("writing {}", show(&path)))?;
    Ok(Some(path))
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
