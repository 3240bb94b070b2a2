//! `prune`: remove every network object of boma-qvm after a crash: our dnsmasq (by its pid file,
//! checked against /proc), our nft table, our taps (`bq-*`) and bridge, and the runtime files.

use std::fmt;

use rtnetlink::packet_route::link::InfoKind;

use super::config::{DEFAULT_BRIDGE, NetConfig};
use super::files::NetFiles;
use super::ident::TAP_PREFIX;
use super::rtnl::Rtnl;
use super::{dnsmasq, nft};
use crate::Result;
use crate::paths::Dirs;

/// Bridges whose name starts with this are ours (besides the one named in the saved config).
pub const BRIDGE_PREFIX: &str = "boma-qvm";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// What was removed, one human-readable item each.
    pub removed: Vec<String>,
}

impl fmt::Display for PruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.removed.is_empty() {
            return writeln!(f, "nothing of the boma-qvm network was left");
        }
        for r in &self.removed {
            writeln!(f, "removed {r}")?;
        }
        Ok(())
    }
}

/// Remove all our network objects. Taps of still-running VMs are removed too: stop the VMs first.
/// The dnsmasq log is kept for post-mortems.
pub async fn prune(dirs: &Dirs) -> Result<PruneReport> {
    let files = NetFiles::new(dirs);
    let mut report = PruneReport::default();
    let saved: Option<NetConfig> = std::fs::read_to_string(files.config())
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let our_bridge = saved
        .map(|c| c.bridge)
        .unwrap_or_else(|| DEFAULT_BRIDGE.to_string());

    if let Some(pid) = dnsmasq::running_pid(&files) {
        dnsmasq::stop(&files)?;
        report.removed.push(format!("dnsmasq (pid {pid})"));
    }
    if nft::table_exists()? {
        nft::delete_table()?;
        report
            .removed
            .push(format!("nft table inet {}", nft::TABLE));
    }
    let rtnl = Rtnl::connect()?;
    for l in rtnl.links().await? {
        let tap = l.kind == Some(InfoKind::Tun) && l.name.starts_with(TAP_PREFIX);
        let bridge = l.kind == Some(InfoKind::Bridge)
            && (l.name == our_bridge || l.name.starts_with(BRIDGE_PREFIX));
        if tap || bridge {
            rtnl.delete(l.index).await?;
            report
                .removed
                .push(format!("{} {}", if tap { "tap" } else { "bridge" }, l.name));
        }
    }
    if files.ip_forward_marker().exists() {
        super::sysctl::restore_ip_forward(&files.ip_forward_marker())?;
        report
            .removed
            .push("IPv4 forwarding (was off before)".to_string());
    }
    for path in [
        files.pid(),
        files.leases(),
        files.dhcp_hosts(),
        files.hosts(),
        files.servers(),
        files.dnsmasq_conf(),
        files.ruleset(),
        files.config(),
    ] {
        let _ = std::fs::remove_file(path);
    }
    if files.vms().exists() {
        let _ = std::fs::remove_dir_all(files.vms());
        report.removed.push("VM network records".to_string());
    }
    tracing::info!("pruned the network: {} object(s)", report.removed.len());
    Ok(report)
}
