//! What a cycle was asked to do, saved beside the VM (`cycle.json`) so `apply`, `assert` and
//! `reset` on a kept VM use the same repo, host, cert tier and vars as the cycle that made it.

use crate::ansible::{CertOptions, CertPlan, CertTier};
use crate::error::IoContext;
use crate::machine::Machine;
use crate::net::Subnet;
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
    pub keep: bool,
    pub snapshot: bool,
    pub egress: bool,
    pub subnet: Subnet,
    /// Where run directories go (`~/integration-runs`).
    pub runs_root: PathBuf,
    /// This cycle's run directory, once it has one.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
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

    /// Write `cycle.json` into the VM's run directory.
    pub fn save(&self, vm_dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("config serialises");
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
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(String::from)
        })
        .unwrap_or_else(|| "unknown".into())
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

/// `debian-13-built (created 2026-..., sha256 0257c02d...)` for the image backing `vm`'s overlay.
fn golden_of(vm: &Machine) -> Option<String> {
    let overlay = vm.spec().ok()?.disk?;
    let backing = crate::guest::image::overlay::info(&overlay).ok()?.backing?;
    let dir = backing.parent()?.to_path_buf();
    let m = crate::guest::image::Manifest::read(&dir).ok()?;
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

    #[test]
    fn le_tiers_need_egress() {
        let cfg = CycleConfig {
            host: "askari".into(),
            repo: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/boma"),
            certs: CertTier::Internal,
            prod_opt_in: false,
            extra_vars: vec![],
            keep: false,
            snapshot: false,
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
