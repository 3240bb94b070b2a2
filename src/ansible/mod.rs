//! Drive the real Ansible against the test VM, so the VM "becomes" a host of an Ansible repo.
//!
//! - [`Profile`]: an Ansible repo laid out like boma (inventory, `site.yml`,
//!   `tests/integration/verify.yml`, `tests/integration/overrides/HOST.yml`) and the host to mirror.
//! - [`inventory`]: the transient inventory. It holds only the VM, under HOST's name, in HOST's
//!   real groups (with their parent/child edges and group vars) and with HOST's own inventory vars.
//!   The real inventory is never edited.
//! - [`vars`]: the VM's connection vars and the documented order in which extra vars are layered.
//! - [`certs`]: the `--certs` tiers and the vars they map to.
//! - [`safety`]: the invariants, checked by asking Ansible itself before every playbook run:
//!   exactly one host in scope, HOST, whose effective address is inside the isolated subnet.
//! - [`run`]: [`Session`] runs `ansible-playbook` (site or verify), tees its output to the
//!   terminal and a log file, with a timeout, and returns the recap.

pub mod certs;
pub mod extra;
pub mod inventory;
mod outcome;
pub mod output;
pub mod profile;
pub mod run;
pub mod safety;
mod scope;
mod tee;
pub mod vars;

pub use certs::{CertOptions, CertPlan, CertTier, Secret};
pub use inventory::{InventoryExport, TransientInventory};
pub use outcome::{Playbook, PlaybookOutcome, RunOptions};
pub use output::{Recap, TaskFailure};
pub use profile::Profile;
pub use run::{Session, SessionConfig};
pub use safety::{ScopeReport, Subnet};
pub use vars::Connection;

use crate::Result;
use std::path::PathBuf;

/// How to install the Ansible tools when there are none at all.
pub const INSTALL_FIX: &str = "No Ansible on this machine at all: `.ci/setup` installs ansible-core \
     (>= 2.17) into /opt/boma-qvm-ansible and records it.";

/// The setting naming the directory boma-qvm takes `ansible-playbook`, `ansible-inventory` and
/// `ansible` from, ahead of PATH. The integration_test role writes it to
/// `/etc/boma-qvm/config.env`: the Ansible that applied the role.
pub const DIR_VAR: &str = "BOMA_QVM_ANSIBLE_DIR";

/// The oldest ansible-core boma-qvm supports (the Debian 13 guest's Python 3.13 needs it).
pub const MIN_VERSION: (u32, u32) = (2, 17);

/// Find an Ansible program (`ansible-playbook`, `ansible-inventory`, `ansible`): in the
/// directory `BOMA_QVM_ANSIBLE_DIR` names when it is set, else on PATH; or say how to fix it.
pub fn find_tool(program: &str) -> Result<PathBuf> {
    locate(program).map(|l| l.path)
}

/// [`find_tool`], saying where the program came from (for `doctor`).
pub fn locate(program: &str) -> Result<crate::tools::Located> {
    crate::tools::locate(program, DIR_VAR, INSTALL_FIX)
}

/// The ansible-core version in `ansible-playbook --version`'s first line
/// (`ansible-playbook [core 2.18.12]`).
pub fn core_version(version_output: &str) -> Option<(u32, u32, u32)> {
    let line = version_output.lines().next()?;
    let v = line.split("core ").nth(1)?.trim_end_matches(']').trim();
    let mut parts = v.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .ok()
    });
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// How a cycle confines the processes it starts for Ansible (see `net::confine`, ADR-026):
/// through `boma-qvm __confined`, on the VM network and loopback only, or on loopback only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confine {
    /// The boma-qvm binary that runs `__confined`.
    pub exe: PathBuf,
    /// The state directory whose network the VM is on (direct mode).
    pub state: PathBuf,
    /// netd's socket when netd runs the VM's network.
    pub netd: Option<PathBuf>,
    /// No network at all (reading the real inventory needs none).
    pub loopback_only: bool,
}

impl Confine {
    /// The program and leading arguments that run `program` confined.
    pub fn wrap(&self, program: &std::path::Path) -> (PathBuf, Vec<std::ffi::OsString>) {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--state-dir".into(),
            self.state.clone().into(),
            "__confined".into(),
        ];
        if let Some(n) = &self.netd {
            args.extend(["--netd".into(), n.clone().into()]);
        }
        if self.loopback_only {
            args.push("--loopback-only".into());
        }
        args.extend(["--".into(), program.into()]);
        (self.exe.clone(), args)
    }

    /// The same, with no network at all.
    pub fn loopback(&self) -> Confine {
        Confine {
            loopback_only: true,
            ..self.clone()
        }
    }
}

/// Environment every Ansible invocation gets: no host key prompts (each VM has a new key), no
/// retry files in the user's repo, and an unparsable inventory is an error, not an empty scope.
pub fn base_env() -> Vec<(&'static str, String)> {
    vec![
        ("ANSIBLE_HOST_KEY_CHECKING", "False".into()),
        ("ANSIBLE_RETRY_FILES_ENABLED", "False".into()),
        ("ANSIBLE_INVENTORY_UNPARSED_FAILED", "True".into()),
        ("ANSIBLE_DEPRECATION_WARNINGS", "False".into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confined_commands_go_through_the_wrapper() {
        let c = Confine {
            exe: "/usr/local/bin/boma-qvm".into(),
            state: "/s".into(),
            netd: Some("/run/boma-qvm/netd.sock".into()),
            loopback_only: false,
        };
        let (exe, args) = c.wrap(std::path::Path::new("/opt/a/bin/ansible-playbook"));
        assert_eq!(exe, PathBuf::from("/usr/local/bin/boma-qvm"));
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        assert_eq!(
            args,
            [
                "--state-dir",
                "/s",
                "__confined",
                "--netd",
                "/run/boma-qvm/netd.sock",
                "--",
                "/opt/a/bin/ansible-playbook"
            ]
        );
        let (_, args) = c.loopback().wrap(std::path::Path::new("x"));
        assert!(args.iter().any(|a| a == "--loopback-only"));
    }

    #[test]
    fn reads_the_core_version() {
        assert_eq!(
            core_version("ansible-playbook [core 2.18.12]\n  config file = None\n"),
            Some((2, 18, 12))
        );
        assert_eq!(
            core_version("ansible-playbook [core 2.14.18]"),
            Some((2, 14, 18))
        );
        assert_eq!(
            core_version("ansible-playbook [core 2.19.0rc1]"),
            Some((2, 19, 0))
        );
        assert_eq!(core_version("ansible-playbook 2.9.6"), None);
        assert_eq!(core_version(""), None);
    }
}
