//! What a cycle was asked to do, saved beside the VM (`cycle.json`) so `apply`, `assert` and
//! `reset` on a kept VM use the same repo, host, cert tier and vars as the cycle that made it.

use crate::ansible::{CertOptions, CertPlan, CertTier, Secret};
use crate::error::IoContext;
use crate::machine::Machine;
use crate::net::Subnet;
use crate::secrets::{MIN_LEN, Scrubber};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CycleConfig {
    pub host: String,
    /// The Ansible repo (absolute).
    pub repo: PathBuf,
    pub certs: CertTier,
    /// The explicit opt-in le-prod-wildcard requires (`--accept-prod-cert-risk`).
    pub prod_opt_in: bool,
    /// The user's own `-e` values, layered after the cert tier.
    pub extra_vars: Vec<String>,
    /// Names of extra vars marked secret (`--secret-var NAME`): each value is read from the
    /// environment variable NAME whenever a playbook runs, and never stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_vars: Vec<String>,
    pub keep: bool,
    pub snapshot: bool,
    /// Run verify before the reboot too (`--skip-verify-before-reboot` turns it off).
    #[serde(default = "yes")]
    pub verify_before_reboot: bool,
    pub egress: bool,
    pub subnet: Subnet,
    /// Where run directories go (`~/integration-runs`).
    pub runs_root: PathBuf,
    /// This cycle's run directory, once it has one.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl CycleConfig {
    pub fn cert_plan(&self) -> Result<CertPlan> {
        let opts = CertOptions {
            egress: self.egress,
            prod_opt_in: self.prod_opt_in,
            ..CertOptions::default()
        };
        self.certs.plan(&opts, |k| std::env::var(k).ok())
    }

    /// The vars marked secret with their values from the environment, or a refusal naming the
    /// variable and the fix (unset, empty, or too short to scrub).
    pub fn secrets(&self) -> Result<Vec<Secret>> {
        self.secrets_from(|k| std::env::var(k).ok())
    }

    /// [`CycleConfig::secrets`] with `env` for the environment.
    pub fn secrets_from(&self, env: impl Fn(&str) -> Option<String>) -> Result<Vec<Secret>> {
        self.secret_vars
            .iter()
            .map(|name| {
                let value = env(name).unwrap_or_default();
                if value.is_empty() {
                    return Err(Error::input(
                        format!(
                            "--secret-var {name}: the environment variable {name} is not set \
                             (a secret var's value is read from it, never from the command line)"
                        ),
                        format!(
                            "export {name}=... in this shell (kept VMs: the cycle that made the VM \
                             passed --secret-var {name}, and values are never stored), then run again"
                        ),
                    ));
                }
                if value.len() < MIN_LEN {
                    return Err(Error::input(
                        format!(
                            "--secret-var {name}: its value is {} characters; a secret shorter \
                             than {MIN_LEN} cannot be scrubbed from logs without masking ordinary text",
                            value.len()
                        ),
                        format!(
                            "use a longer secret, or pass it as a plain -e {name}=... if it need not \
                             be hidden"
                        ),
                    ));
                }
                Ok(Secret {
                    var: name.clone(),
                    value,
                })
            })
            .collect()
    }

    /// Everything this cycle must scrub from what it writes, as far as it can be known: the
    /// cert tier's credential, `$GANDI_API_KEY` whatever the tier, and the secret vars that
    /// are set. Never fails (a missing value is refused where it is needed).
    pub fn scrubber(&self) -> Scrubber {
        let mut values: Vec<String> = self
            .secret_vars
            .iter()
            .filter_map(|n| std::env::var(n).ok())
            .filter(|v| v.len() >= MIN_LEN)
            .collect();
        values.extend(
            self.cert_plan()
                .ok()
                .and_then(|p| p.secret)
                .map(|s| s.value),
        );
        values.extend(crate::ansible::certs::credential_in_env());
        Scrubber::new(values)
    }

    /// `<runs_root>/<UTC timestamp>-<host>/`, created 0700 (this user's only: logs, console and
    /// the guest's journal).
    pub fn new_run_dir(&self) -> Result<PathBuf> {
        let dir = self.runs_root.join(format!(
            "{}-{}",
            utc_stamp(crate::machine::events::now() as u64),
            self.host
        ));
        crate::machine::rundir::create_private(&dir)?;
        Ok(dir)
    }

    /// Write `cycle.json` into the VM's run directory: names of secret vars, never their values
    /// (scrubbed, should one also appear in a plain `-e`).
    pub fn save(&self, vm_dir: &Path) -> Result<()> {
        let mut v = serde_json::to_value(self).expect("config serialises");
        self.scrubber().scrub_json(&mut v);
        let text = serde_json::to_string_pretty(&v).expect("config serialises");
        std::fs::write(vm_dir.join("cycle.json"), text).ctx(|| "writing cycle.json".into())
    }

    /// The config of the cycle that made the VM in `vm_dir`.
    pub fn load(vm_dir: &Path, name: &str) -> Result<CycleConfig> {
        let p = vm_dir.join("cycle.json");
        let text = std::fs::read_to_string(&p).map_err(|_| {
            Error::not_found(
                format!("a cycle for {name}"),
                "apply/verify/reset work on a VM made by `boma-qvm cycle`",
            )
        })?;
        serde_json::from_str(&text).map_err(|e| {
            Error::input(
                format!("{} is unreadable: {e}", p.display()),
                "run the cycle again",
            )
        })
    }
}

/// `20261126T051400Z` from Unix seconds: the run directory's sortable UTC stamp.
pub fn utc_stamp(secs: u64) -> String {
    crate::guest::image::tool::utc_rfc3339(secs).replace(['-', ':'], "")
}

fn first_line(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
    crate::tools::first_line(program, args).unwrap_or_else(|| "unknown".into())
}

/// Versions for the report; `vm` (when there is one) names the golden image behind its overlay.
pub fn versions(vm: Option<&Machine>) -> super::report::Versions {
    super::report::Versions {
        boma_qvm: env!("CARGO_PKG_VERSION").into(),
        qemu: first_line("qemu-system-x86_64", &["--version"]),
        // The same ansible-playbook the cycle runs (BOMA_QVM_ANSIBLE_DIR, else PATH).
        ansible: crate::ansible::find_tool("ansible-playbook")
            .map(|p| first_line(p, &["--version"]))
            .unwrap_or_else(|_| "unknown".into()),
        image: vm.and_then(golden_of).unwrap_or_default(),
    }
}

/// `debian-13-built (created 2026-..., sha256 0257c02d...)` for the golden image under `vm`'s
/// overlay (directly, or under the warm template the overlay is backed by).
fn golden_of(vm: &Machine) -> Option<String> {
    let mut disk = vm.spec().ok()?.disk?;
    let m = (0..4).find_map(|_| {
        let backing = crate::guest::image::overlay::info(&disk).ok()?.backing?;
        let found = crate::guest::image::Manifest::read(backing.parent()?).ok();
        disk = backing;
        found
    })?;
    Some(format!(
        "{} (created {}, sha256 {})",
        m.name,
        m.created,
        &m.disk_sha256[..m.disk_sha256.len().min(12)]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(1_795_670_061), "20261126T051421Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
    }

    /// report.json's versions.ansible comes from the ansible-playbook the cycle runs
    /// (BOMA_QVM_ANSIBLE_DIR first), not from whatever PATH holds. The stand-in prints a version
    /// no real Ansible has, so only it can have produced the string.
    #[test]
    fn the_reported_ansible_is_the_resolved_one() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let pb = d.path().join("ansible-playbook");
        std::fs::write(&pb, "#!/bin/sh\necho 'ansible-playbook [core 9.99.1]'\n").unwrap();
        std::fs::set_permissions(&pb, std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: no other test in this binary reads or writes this variable, and std's own
        // environment lock orders this against other threads' std::env reads.
        unsafe { std::env::set_var(crate::ansible::DIR_VAR, d.path()) };
        let v = versions(None);
        unsafe { std::env::remove_var(crate::ansible::DIR_VAR) };
        assert_eq!(v.ansible, "ansible-playbook [core 9.99.1]");
    }

    /// cycle.json keeps a secret var's name, never its value, even when a plain -e repeats it.
    #[test]
    fn cycle_json_holds_secret_var_names_only() {
        let d = tempfile::tempdir().unwrap();
        let value = "cycl3-json-s3cret";
        // SAFETY: no other test reads or writes this variable.
        unsafe { std::env::set_var("bq_cfg_secret", value) };
        let cfg = CycleConfig {
            host: "askari".into(),
            repo: "/r".into(),
            certs: CertTier::Internal,
            prod_opt_in: false,
            extra_vars: vec![format!("note={value}")],
            secret_vars: vec!["bq_cfg_secret".into()],
            keep: false,
            snapshot: false,
            verify_before_reboot: true,
            egress: true,
            subnet: "192.168.231.0/24".parse().unwrap(),
            runs_root: "/tmp".into(),
            run_dir: None,
        };
        assert_eq!(cfg.secrets().unwrap()[0].value, value);
        cfg.save(d.path()).unwrap();
        unsafe { std::env::remove_var("bq_cfg_secret") };
        let text = std::fs::read_to_string(d.path().join("cycle.json")).unwrap();
        assert!(!text.contains(value), "{text}");
        let back = CycleConfig::load(d.path(), "x").unwrap();
        assert_eq!(back.secret_vars, ["bq_cfg_secret"]);
        let e = back.secrets().unwrap_err().to_string();
        assert!(e.contains("export bq_cfg_secret="), "{e}");
    }

    #[test]
    fn le_tiers_need_egress() {
        let cfg = CycleConfig {
            host: "askari".into(),
            repo: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/boma"),
            certs: CertTier::Internal,
            prod_opt_in: false,
            extra_vars: vec![],
            secret_vars: vec![],
            keep: false,
            snapshot: false,
            verify_before_reboot: true,
            egress: true,
            subnet: "192.168.231.0/24".parse().unwrap(),
            runs_root: "/tmp".into(),
            run_dir: None,
        };
        let mut staging = cfg.clone();
        staging.certs = CertTier::LeStaging;
        staging.egress = false;
        assert!(staging.cert_plan().is_err(), "le-* tiers need egress");
    }
}
