//! Accelerator choice: KVM only when it is really usable, TCG otherwise.
//!
//! `/dev/kvm` existing is not enough: on nested/PVM hosts it opens fine but ordinary guests hang
//! at "Booting from ROM". So `auto` also requires the CPU to advertise `vmx` or `svm`.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Scale a timeout that is right for KVM to this accelerator. Under TCG a Debian guest is
    /// about five times slower to SSH (~100 s measured vs ~20 s), so timeouts grow to match.
    pub fn scale(self, kvm: Duration) -> Duration {
        match self {
            Accel::Kvm => kvm,
            Accel::Tcg => kvm * 5,
        }
    }
}

/// What the host offers, and why KVM is or is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmProbe {
    pub dev_usable: bool,
    pub cpu_flag: bool,
}

impl KvmProbe {
    pub fn read() -> Self {
        let dev_usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        KvmProbe {
            dev_usable,
            cpu_flag: cpu_has_virt_flag(&cpuinfo),
        }
    }

    pub fn usable(&self) -> bool {
        self.dev_usable && self.cpu_flag
    }

    /// Why KVM is not usable, in one clause (empty when it is).
    pub fn reason(&self) -> String {
        match (self.dev_usable, self.cpu_flag) {
            (true, true) => String::new(),
            (false, _) => "/dev/kvm is missing or not usable by this user".into(),
            (true, false) => "/dev/kvm exists but the CPU advertises no vmx/svm flag (nested or PVM virtualisation, where guests hang)".into(),
        }
    }
}

/// True when a `flags` line of /proc/cpuinfo lists `vmx` (Intel) or `svm` (AMD).
pub fn cpu_has_virt_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Resolve the user's choice against the probe. Returns the accelerator and, for a fallback,
/// the one warning line to print.
pub fn resolve(
    choice: AccelChoice,
    probe: &KvmProbe,
    force: bool,
) -> Result<(Accel, Option<String>)> {
    match choice {
        AccelChoice::Tcg => Ok((Accel::Tcg, None)),
        AccelChoice::Auto if probe.usable() => Ok((Accel::Kvm, None)),
        AccelChoice::Auto => Ok((
            Accel::Tcg,
            Some(format!(
                "warning: KVM not usable ({}); using TCG software emulation, expect boots several times slower",
                probe.reason()
            )),
        )),
        AccelChoice::Kvm if probe.usable() || force => Ok((Accel::Kvm, None)),
        AccelChoice::Kvm => Err(Error::input(
            format!("--accel kvm refused: {}", probe.reason()),
            "use --accel auto or --accel tcg; or add --force-accel to try KVM anyway",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_FLAGS: &str = "processor\t: 0\nflags\t\t: fpu vme de pse sse sse2 hypervisor\n";
    const VMX: &str = "flags\t\t: fpu vmx sse\n";

    #[test]
    fn flag_detection() {
        assert!(!cpu_has_virt_flag(NO_FLAGS));
        assert!(cpu_has_virt_flag(VMX));
        assert!(cpu_has_virt_flag("flags : svm"));
        assert!(!cpu_has_virt_flag("flags : vmxnet"));
    }

    #[test]
    fn auto_needs_both_device_and_flag() {
        let pvm = KvmProbe {
            dev_usable: true,
            cpu_flag: false,
        };
        let (a, warn) = resolve(AccelChoice::Auto, &pvm, false).unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(warn.unwrap().contains("no vmx/svm"));
        let real = KvmProbe {
            dev_usable: true,
            cpu_flag: true,
        };
        assert_eq!(
            resolve(AccelChoice::Auto, &real, false).unwrap(),
            (Accel::Kvm, None)
        );
    }

    #[test]
    fn forced_kvm_is_refused_unless_overridden() {
        let none = KvmProbe {
            dev_usable: false,
            cpu_flag: false,
        };
        let err = resolve(AccelChoice::Kvm, &none, false).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--force-accel"));
        assert_eq!(
            resolve(AccelChoice::Kvm, &none, true).unwrap().0,
            Accel::Kvm
        );
    }

    #[test]
    fn on_a_pvm_host_auto_picks_tcg_and_says_why() {
        // Judged independently of KvmProbe: /dev/kvm is there, and grep finds no vmx/svm in
        // /proc/cpuinfo (these machines: a nested PVM, where KVM guests hang).
        let sh = |c: &str| {
            std::process::Command::new("sh")
                .args(["-c", c])
                .status()
                .unwrap()
                .success()
        };
        let pvm_host = sh("test -e /dev/kvm") && !sh("grep -qwE 'vmx|svm' /proc/cpuinfo");
        if !pvm_host {
            eprintln!("skipped: this host is not a PVM host (no /dev/kvm, or the CPU has vmx/svm)");
            return;
        }
        let (accel, warning) = resolve(AccelChoice::Auto, &KvmProbe::read(), false).unwrap();
        assert_eq!(accel, Accel::Tcg);
        assert!(warning.unwrap().contains("no vmx/svm"));
    }

    #[test]
    fn tcg_scales_timeouts() {
        assert_eq!(
            Accel::Tcg.scale(Duration::from_secs(60)),
            Duration::from_secs(300)
        );
        assert_eq!(
            Accel::Kvm.scale(Duration::from_secs(60)),
            Duration::from_secs(60)
        );
    }
}
