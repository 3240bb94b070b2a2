//! netd's wire protocol: one JSON line per request, one per answer (`Ok(Reply)` or
//! `Err(WireError)`). A `Tap` answer carries the tap's fd as SCM_RIGHTS on the same message.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::net::{NetConfig, NetStatus, VmNet};

/// The longest line either side reads (a status of many VMs fits many times over).
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Bring the network up (or check it is). `config`, when given, must be netd's own
    /// (bridge, subnet); none: whatever netd runs.
    Up {
        config: Option<NetConfig>,
    },
    /// Register (or update) a VM of the caller's; the network is brought up first.
    Register {
        vm: String,
        dns_names: Vec<String>,
        egress: bool,
        /// The caller's state directory (its VMs' home), for `Prune`.
        state: PathBuf,
    },
    /// Remove a VM's registration; the network goes down once no VM is left.
    Unregister {
        vm: String,
    },
    /// A VM's registration and current DHCP lease.
    Vm {
        vm: String,
    },
    /// A tap for the VM on our bridge; its fd comes with the answer.
    Tap {
        vm: String,
    },
    /// Switch the VM's egress.
    Egress {
        vm: String,
        on: bool,
    },
    Status,
    /// Take the network down (refused while VMs are registered).
    Down,
    /// Unregister every VM of the caller's uid and state; down when none is left.
    Prune {
        state: PathBuf,
    },
    /// A veth into the network namespace of `child`, the caller's own child (confinement).
    /// The address is the caller's until its connection closes.
    Confine {
        child: i32,
    },
}

/// A confined process's place on the VM network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// The interface's name in the child's namespace.
    pub ifname: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// The host end on the bridge (for messages).
    pub host_end: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Net {
        config: NetConfig,
    },
    Vm {
        vm: VmNet,
        lease: Option<Ipv4Addr>,
    },
    Unregistered {
        was: bool,
        network_down: bool,
    },
    /// The tap `name`; its fd is attached.
    Tap {
        name: String,
    },
    Done,
    Status {
        status: NetStatus,
    },
    Removed {
        removed: Vec<String>,
    },
    Confined {
        confinement: Confinement,
    },
}

pub type Answer = std::result::Result<Reply, WireError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_single_json_lines() {
        let r = Request::Egress {
            vm: "boma-it-a".into(),
            on: false,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"op":"egress","vm":"boma-it-a","on":false}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        let a: Answer = Err(WireError {
            code: 11,
            problem: "p".into(),
            fix: "f".into(),
        });
        let line = serde_json::to_string(&a).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Answer>(&line).unwrap(), a);
        let a: Answer = Ok(Reply::Done);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"Ok":{"reply":"done"}}"#
        );
    }
}
