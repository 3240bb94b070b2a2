//! What a VM is: the spec written to its run directory and turned into QEMU's argv.

use crate::machine::accel::Accel;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Every VM boma-qvm makes is named with this prefix, so `prune` can find all of them.
pub const VM_PREFIX: &str = "boma-it-";

/// The design's machine: 2 vCPU, 3 GiB of RAM, a 20 GiB thin overlay.
pub const DEFAULT_CPUS: u32 = 2;
pub const DEFAULT_MEMORY_MIB: u32 = 3072;
pub const DEFAULT_DISK_GIB: u64 = 20;

/// Sizes QEMU (q35) and a Linux guest can actually run; anything outside is refused up front.
pub const MAX_CPUS: u32 = 255;
pub const MIN_MEMORY_MIB: u32 = 128;
pub const MAX_DISK_GIB: u64 = 16 * 1024;

/// Check a machine's size before anything is made. `host_mem_mib` is the host's total RAM
/// (a guest larger than the host cannot run, whatever is free).
pub fn check_size(cpus: u32, memory_mib: u32, disk_gib: u64, host_mem_mib: u64) -> Result<()> {
    if !(1..=MAX_CPUS).contains(&cpus) {
        return Err(Error::input(
            format!("--cpus {cpus} is out of range (1 to {MAX_CPUS})"),
            format!("give a vCPU count from 1 to {MAX_CPUS}; the default is {DEFAULT_CPUS}"),
        ));
    }
    if memory_mib < MIN_MEMORY_MIB || u64::from(memory_mib) > host_mem_mib {
        return Err(Error::input(
            format!(
                "--memory {memory_mib} MiB is out of range ({MIN_MEMORY_MIB} MiB to this host's {host_mem_mib} MiB)"
            ),
            format!("give the guest's RAM in MiB; the default is {DEFAULT_MEMORY_MIB}"),
        ));
    }
    if !(1..=MAX_DISK_GIB).contains(&disk_gib) {
        return Err(Error::input(
            format!("--disk-gib {disk_gib} is out of range (1 to {MAX_DISK_GIB})"),
            format!("give the overlay's virtual size in GiB; the default is {DEFAULT_DISK_GIB}"),
        ));
    }
    Ok(())
}

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
    /// netd's socket when netd runs this VM's network (its tap, lease, egress); `None`: the
    /// network of this state, run directly (root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netd: Option<std::path::PathBuf>,
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
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
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
    fn sizes_outside_what_can_run_are_refused() {
        let host = 24 * 1024;
        check_size(DEFAULT_CPUS, DEFAULT_MEMORY_MIB, DEFAULT_DISK_GIB, host).unwrap();
        check_size(1, MIN_MEMORY_MIB, 1, host).unwrap();
        for (cpus, mem, disk, flag) in [
            (0, 3072, 20, "--cpus 0"),
            (1000, 3072, 20, "--cpus 1000"),
            (2, 0, 20, "--memory 0"),
            (2, 64, 20, "--memory 64"),
            (2, 48 * 1024, 20, "--memory 49152"),
            (2, 3072, 0, "--disk-gib 0"),
            (2, 3072, 17_179_869_185, "--disk-gib 17179869185"),
            (2, 3072, 1_000_000, "--disk-gib 1000000"),
        ] {
            let e = check_size(cpus, mem, disk, host).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            let text = e.to_string();
            assert!(text.contains(flag) && text.contains("fix:"), "{text}");
        }
    }

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
            netd: None,
        });
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&j).unwrap(), s);
    }
}
