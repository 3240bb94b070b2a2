//! What a restore depends on ([`Want`]), its fingerprint, and what differs between two.

use super::TEMPLATE_HOST;
use crate::guest::image::Image;
use crate::machine::provision::{self, UpRequest};
use crate::machine::qemu::argv;
use crate::machine::rundir::RunDir;
use crate::machine::spec::{self, NicSpec};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Bumped when the contract changes (the seed, what re-identification relies on).
const CONTRACT_VERSION: u32 = 1;

/// What a template's guest is, as cloud-init sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedContract {
    pub version: u32,
    pub datasource: String,
    pub user: String,
    pub network: String,
}

impl SeedContract {
    pub fn current() -> Self {
        SeedContract {
            version: CONTRACT_VERSION,
            datasource: "NoCloud: a cidata ISO on /dev/vdb; the template's instance-id".into(),
            user: crate::guest::ssh::USER.into(),
            network: "dhcp4 on the NIC matched by name en*, client id = MAC".into(),
        }
    }
}

/// Everything a restore depends on. Equal `Want`s restore into each other; the fingerprint
/// (a hash of it) names the template's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    pub golden: String,
    pub golden_sha256: String,
    /// `qemu-system-x86_64 --version`'s first line.
    pub qemu: String,
    pub machine: String,
    pub accel: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u64,
    pub nic: String,
    pub seed: SeedContract,
    /// QEMU's argv for this machine with per-VM paths, names and MAC normalised: a device
    /// added, removed or changed in `qemu/argv.rs` is a different machine.
    pub argv: Vec<String>,
}

impl Want {
    /// What a VM for `req` on `img` needs of a template.
    pub fn new(img: &Image, req: &UpRequest) -> Result<Want> {
        let mut spec = provision::base_spec(req, &spec::vm_name(TEMPLATE_HOST)?, img.boot.clone());
        // Neither changes the guest-visible machine.
        spec.tcg_tb_size_mib = None;
        spec.console_patterns.clear();
        spec.host = None;
        spec.disk = Some("/warm/disk.qcow2".into());
        spec.seed = Some("/warm/seed.iso".into());
        spec.nic = Some(NicSpec {
            mac: "52:54:00:00:00:00".into(),
            tap: "tap".into(),
            bridge: "bridge".into(),
            netd: None,
        });
        // With `-sandbox` (main's seccomp policy) in it: a QEMU that may not do what the
        // template's did is another machine. Not the account QEMU runs as: the saved state
        // holds nothing of it, and the template's files are opened by boma-qvm and handed over.
        let argv = argv::build(
            &spec,
            &RunDir::new("/warm"),
            Some(3),
            &argv::Handed::default(),
        );
        let machine = argv
            .windows(2)
            .find(|w| w[0] == "-machine")
            .map(|w| w[1].clone())
            .unwrap_or_default();
        Ok(Want {
            golden: img.name.clone(),
            golden_sha256: img.manifest.disk_sha256.clone(),
            qemu: qemu_version(&spec.qemu_binary())?,
            machine,
            accel: req.accel.as_str().into(),
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            disk_gib: req.disk_gib,
            nic: "virtio-net-pci".into(),
            seed: SeedContract::current(),
            argv,
        })
    }

    /// The first 16 hex digits of a SHA-256 over the whole `Want`.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(self).expect("serialises");
        hex::encode(Sha256::digest(&json))[..16].to_string()
    }

    /// `tcg, 2 vCPU, 3072 MiB, 20 GiB`.
    pub fn shape(&self) -> String {
        format!(
            "{}, {} vCPU, {} MiB, {} GiB",
            self.accel, self.cpus, self.memory_mib, self.disk_gib
        )
    }

    pub(super) fn same_shape(&self, o: &Want) -> bool {
        (&self.accel, self.cpus, self.memory_mib, self.disk_gib)
            == (&o.accel, o.cpus, o.memory_mib, o.disk_gib)
    }
}

/// What differs between the template `had` and what is wanted now, one phrase each.
pub fn differences(had: &Want, want: &Want) -> Vec<String> {
    let mut d = Vec::new();
    let mut diff = |what: &str, a: &str, b: &str| {
        if a != b {
            d.push(format!("{what} `{a}` -> `{b}`"));
        }
    };
    diff("golden image", &had.golden, &want.golden);
    diff(
        "golden sha256",
        &had.golden_sha256[..had.golden_sha256.len().min(12)],
        &want.golden_sha256[..want.golden_sha256.len().min(12)],
    );
    diff("QEMU", &had.qemu, &want.qemu);
    diff("machine type", &had.machine, &want.machine);
    diff("accelerator", &had.accel, &want.accel);
    diff("vCPUs", &had.cpus.to_string(), &want.cpus.to_string());
    diff(
        "memory MiB",
        &had.memory_mib.to_string(),
        &want.memory_mib.to_string(),
    );
    diff(
        "disk GiB",
        &had.disk_gib.to_string(),
        &want.disk_gib.to_string(),
    );
    diff("NIC", &had.nic, &want.nic);
    if had.seed != want.seed {
        d.push(format!(
            "seed contract v{} -> v{}",
            had.seed.version, want.seed.version
        ));
    }
    if had.argv != want.argv {
        let gone: Vec<&String> = had.argv.iter().filter(|a| !want.argv.contains(a)).collect();
        let new: Vec<&String> = want.argv.iter().filter(|a| !had.argv.contains(a)).collect();
        d.push(format!(
            "QEMU devices changed (gone: {gone:?}; new: {new:?})"
        ));
    }
    d
}

/// `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
fn qemu_version(binary: &Path) -> Result<String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| {
            Error::missing_tool(
                binary.display().to_string(),
                format!("install QEMU (apt-get install qemu-system-x86) ({e})"),
            )
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::machine::warm) fn want() -> Want {
        Want {
            golden: "debian-13-built".into(),
            golden_sha256: "de58dd6fdd3bc7f6175e9ee1d42920cf".into(),
            qemu: "QEMU emulator version 7.2.22".into(),
            machine: "q35".into(),
            accel: "tcg".into(),
            cpus: 2,
            memory_mib: 3072,
            disk_gib: 20,
            nic: "virtio-net-pci".into(),
            seed: SeedContract::current(),
            argv: vec!["-device".into(), "virtio-rng-pci".into()],
        }
    }

    #[test]
    fn the_fingerprint_changes_with_anything_a_restore_depends_on() {
        let base = want();
        let changes: [fn(&mut Want); 8] = [
            |w| w.golden_sha256 = "00".into(),
            |w| w.qemu = "QEMU emulator version 7.2.23".into(),
            |w| w.accel = "kvm".into(),
            |w| w.cpus = 1,
            |w| w.memory_mib = 2048,
            |w| w.disk_gib = 30,
            |w| w.seed.version += 1,
            |w| w.argv.push("-device".into()),
        ];
        for f in changes {
            let mut w = base.clone();
            f(&mut w);
            assert_ne!(w.fingerprint(), base.fingerprint(), "{w:?}");
            assert_eq!(
                differences(&base, &w).len(),
                1,
                "{:?}",
                differences(&base, &w)
            );
        }
        assert_eq!(base.fingerprint(), want().fingerprint());
        assert!(differences(&base, &want()).is_empty());
    }

    #[test]
    fn differences_say_what_changed() {
        let mut w = want();
        w.qemu = "QEMU emulator version 7.2.23".into();
        w.argv.push("pvpanic".into());
        let d = differences(&want(), &w).join("; ");
        assert!(
            d.contains("QEMU `QEMU emulator version 7.2.22` -> `QEMU emulator version 7.2.23`"),
            "{d}"
        );
        assert!(d.contains("new: [\"pvpanic\"]"), "{d}");
    }
}
