//! The safety check before every playbook run, asked of Ansible itself (judged in `safety`).

use super::outcome::Playbook;
use super::run::Session;
use super::safety::{self, ScopeReport};
use crate::error::{Error, IoContext, Result, show};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::time::Duration;

impl Session {
    /// Ask Ansible who is in scope and where it would connect; refuse unless it is exactly HOST,
    /// over ssh, at an address inside the isolated subnet.
    pub async fn check_scope(&self, pb: Playbook) -> Result<ScopeReport> {
        let _secret = self.write_secret()?;
        self.scope(pb).await
    }

    pub(super) async fn scope(&self, pb: Playbook) -> Result<ScopeReport> {
        let (path, pbdir) = self.playbook(pb);
        let tree = tempfile::Builder::new()
            .prefix("scope-")
            .tempdir_in(&self.cfg.dir)
            .ctx(|| "creating a scope dir".into())?;
        let mut args: Vec<OsString> = vec!["all".into()];
        args.extend(self.inventory_args(pb));
        args.extend(["--playbook-dir".into(), pbdir.into()]);
        args.extend(self.extra_var_args());
        args.extend([
            "-m".into(),
            "ansible.builtin.debug".into(),
            "-a".into(),
            safety::PROBE_MSG.into(),
        ]);
        args.extend(["--tree".into(), tree.path().into()]);
        self.quick("ansible", &args).await?;
        let mut results = BTreeMap::new();
        for entry in std::fs::read_dir(tree.path()).ctx(|| "reading the scope results".into())? {
            let entry = entry.ctx(|| "reading the scope results".into())?;
            let text = std::fs::read_to_string(entry.path())
                .ctx(|| format!("reading {}", show(&entry.path())))?;
            let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
            results.insert(entry.file_name().to_string_lossy().into_owned(), value);
        }
        let (address, connection) =
            safety::judge_inventory(&results, &self.profile.host, self.cfg.subnet)?;

        let mut args = self.playbook_args(pb);
        args.push("--list-hosts".into());
        let listed = self.quick("ansible-playbook", &args).await?;
        safety::judge_playbook(
            &safety::parse_list_hosts(&listed),
            &self.profile.host,
            &show(&path),
        )?;
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
    async fn quick(&self, program: &str, args: &[OsString]) -> Result<String> {
        let mut cmd = self.command(program, args)?;
        cmd.env("ANSIBLE_NOCOLOR", "1")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
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
                format!(
                    "check the transient inventory {} and the overlay",
                    show(&self.inventory.path)
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
