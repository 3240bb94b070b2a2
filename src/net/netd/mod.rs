//! `boma-qvm netd`: the one small privileged part. A root daemon (the same binary; the role
//! installs it as `boma-qvm-netd.service`) that owns the shared VM network and does for
//! unprivileged users only what needs CAP_NET_ADMIN: bring the network up (bridge, our nft
//! table, ip_forward, dnsmasq running as `nobody`), register and unregister VMs (static lease,
//! DNS names, owner uid), make a tap on our bridge and pass its fd back (SCM_RIGHTS), switch a
//! VM's egress, put a veth end into a caller's own network namespace (confinement), report
//! status, and take the network down when no VM is left.
//!
//! It listens on a unix socket (default `/run/boma-qvm/netd.sock`, mode 0660, group
//! `boma-qvm`), knows each caller by SO_PEERCRED, and refuses any request about a VM another uid
//! registered (root may act on all). One request, one answer, each a line of JSON
//! ([`proto`]); an error carries the crate's `Error` (problem and fix) and its exit code.
//!
//! Everything else (QEMU, the supervisor, overlays, keys, Ansible) runs as the user.

pub mod client;
pub mod proto;
pub mod server;

pub use client::Client;
pub use proto::{Reply, Request};
pub use server::{Options, serve};

use std::path::PathBuf;

/// Where netd listens by default (the systemd unit uses it; `BOMA_QVM_NETD_SOCKET` overrides).
pub const DEFAULT_SOCKET: &str = "/run/boma-qvm/netd.sock";
/// The setting naming the socket; `none` means: no netd, work directly (root only).
pub const SOCKET_VAR: &str = "BOMA_QVM_NETD_SOCKET";
/// The group whose members may use the socket.
pub const DEFAULT_GROUP: &str = "boma-qvm";
/// netd's own state (its network's files: config, dnsmasq's, VM records).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/boma-qvm/netd";

/// What `BOMA_QVM_NETD_SOCKET` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// Unset: the default socket if it exists, else direct for root.
    Auto,
    /// `none`: never netd.
    Off,
    /// A socket path: always netd.
    Socket(PathBuf),
}

pub fn setting() -> Setting {
    match std::env::var(SOCKET_VAR) {
        Ok(v) if v.is_empty() => Setting::Auto,
        Ok(v) if v == "none" => Setting::Off,
        Ok(v) => Setting::Socket(PathBuf::from(v)),
        Err(_) => Setting::Auto,
    }
}
