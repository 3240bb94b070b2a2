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

/// How to install the Ansible tools when one is missing.
pub const INSTALL_FIX: &str = "install Ansible on this control node: `pip install ansible-core` \
     (or apply boma's integration_test role, which installs boma-qvm's toolchain)";

/// Find an Ansible program on PATH, or say how to install it.
pub fn find_tool(program: &str) -> Result<PathBuf> {
    crate::tools::require(program, INSTALL_FIX)
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
