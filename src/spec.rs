//! What a VM is: the spec written to its run directory and turned into QEMU's argv.

use crate::accel::Accel;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Every VM boma-qvm makes is named with this prefix, so `prune` can find all of them.
pub const VM_PREFIX: &str = "boma-it-";

/// Console lines that mean the guest is in trouble; waits fail fast on them.
pub const DEFAULT_FAILURE_PATTERNS: &[&str] = &[
    "Kernel panic - not syncing",
    "end Kernel panic",
    "You are in emergency mode",
    "Give root password for maintenance",
    "Entering emergency mode",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Boot {
    /// Boot the first disk through SeaBIOS (a bootable image such as Debian's cloud qcow2).
    Disk,
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub mac: String,
    pub tap: String,
    pub bridge: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    /// The inventory host this VM mirrors (`askari`), if any.
    pub host: Option<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    pub boot: Boot,
    /// The VM's writable disk (its overlay); the first virtio disk, /dev/vda.
    pub disk: Option<PathBuf>,
    /// A cloud-init NoCloud seed volume; the second virtio disk, /dev/vdb.
    pub seed: Option<PathBuf>,
    pub nic: Option<NicSpec>,
    /// Extra console failure patterns on top of `DEFAULT_FAILURE_PATTERNS`.
    #[serde(default)]
    pub console_patterns: Vec<String>,
    /// Cap TCG's translation cache (MiB); halves QEMU's RSS under TCG.
    #[serde(default)]
    pub tcg_tb_size_mib: Option<u32>,
    /// The QEMU binary (default `qemu-system-x86_64` on PATH).
    #[serde(default)]
    pub qemu_binary: Option<PathBuf>,
}

impl VmSpec {
    /// A spec with the design's defaults (2 vCPU, 3 GiB) and no devices.
    pub fn new(name: &str, accel: Accel, boot: Boot) -> Self {
        VmSpec {
            name: name.to_string(),
            host: None,
            cpus: 2,
            memory_mib: 3072,
            accel,
            boot,
            disk: None,
            seed: None,
            nic: None,
            console_patterns: Vec::new(),
            tcg_tb_size_mib: None,
            qemu_binary: None,
        }
    }

    pub fn failure_patterns(&self) -> Vec<String> {
        DEFAULT_FAILURE_PATTERNS
            .iter()
            .map(|s| s.to_string())
            .chain(self.console_patterns.iter().cloned())
            .collect()
    }

    pub fn qemu_binary(&self) -> PathBuf {
        self.qemu_binary
            .clone()
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
    }
}

/// `askari` -> `boma-it-askari`; a name that already has the prefix is kept.
pub fn vm_name(host_or_name: &str) -> Result<String> {
    let name = if host_or_name.starts_with(VM_PREFIX) {
        host_or_name.to_string()
    } else {
        format!("{VM_PREFIX}{host_or_name}")
    };
    validate_name(&name)?;
    Ok(name)
}

fn validate_name(name: &str) -> Result<()> {
    let suffix = &name[VM_PREFIX.len()..];
    let ok = !suffix.is_empty()
        && name.len() <= 48
        && suffix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !suffix.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::input(
            format!("invalid VM name `{name}`"),
            "use a host name of lowercase letters, digits and dashes (at most 40 characters), e.g. `askari`",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_the_prefix_once() {
        assert_eq!(vm_name("askari").unwrap(), "boma-it-askari");
        assert_eq!(vm_name("boma-it-askari").unwrap(), "boma-it-askari");
    }

    #[test]
    fn bad_names_are_refused_with_a_fix() {
        for bad in ["", "Askari", "a b", "../x", "-x", &"x".repeat(60)] {
            let e = vm_name(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().contains("fix:"));
        }
    }

    #[test]
    fn spec_round_trips_through_json() {
        let mut s = VmSpec::new(
            "boma-it-a",
            Accel::Tcg,
            Boot::Kernel {
                kernel: "/k".into(),
                initrd: Some("/i".into()),
                append: "console=ttyS0".into(),
            },
        );
        s.nic = Some(NicSpec {
            mac: "52:54:00:00:00:01".into(),
            tap: "bq-1".into(),
            bridge: "boma-qvm0".into(),
        });
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&j).unwrap(), s);
    }
}
