//! The isolated VM network: one bridge (rtnetlink), one tap per VM handed to QEMU as an fd, our
//! own nftables table (NAT out, nothing into the LAN/mesh, VMs reach the host only for DHCP/DNS)
//! and our own dnsmasq (static leases, local DNS answers).
//!
//! Code map: `config`/`subnet` (what), `ident` (per-VM MAC/tap/IP), `bridge`+`rtnl`+`tap`
//! (links), `nft` (firewall), `dnsmasq`+`registry`+`files` (DHCP/DNS), `lease` (finding the
//! VM), `network` (up/down/register), `status`, `doctor`, `prune`.

pub mod access;
pub mod bridge;
pub mod config;
pub mod confine;
pub mod dnsmasq;
pub mod doctor;
pub mod files;
pub mod ident;
pub mod lease;
pub mod netd;
pub mod network;
pub mod nft;
pub mod owned;
pub mod prune;
pub mod registry;
pub mod rtnl;
pub mod status;
pub mod subnet;
pub mod sysctl;
pub mod tap;

pub use config::NetConfig;
pub use doctor::{Warning, doctor};
pub use ident::{Mac, ip_for, mac_for, tap_name_for};
pub use lease::{wait_for_lease, wait_for_ssh, wait_for_tcp_banner};
pub use network::Network;
pub use prune::{PruneReport, prune};
pub use registry::VmNet;
pub use status::{DnsmasqState, NetStatus};
pub use subnet::Subnet;
pub use tap::open_tap;
