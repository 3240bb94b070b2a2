//! `prune`: remove this state's network objects after a crash: our dnsmasq (by its pid file,
//! checked against /proc), and what `owned.json` recorded as ours and is still there as
//! recorded (the nft table, taps, veths, the bridge), and the runtime files. Nothing is found
//! by name: another state's network, or a bridge boma-qvm never made, is never touched.

use std::fmt;

use rtnetlink::packet_route::link::InfoKind;

use super::config::NetConfig;
use super::files::NetFiles;
use super::owned::{self, Owned};
use super::rtnl::Rtnl;
use super::{bridge, dnsmasq};
use crate::Result;
use crate::paths::Dirs;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// What was removed, one human-readable item each.
    pub removed: Vec<String>,
    /// What looked like boma-qvm's but was left alone, and why.
    pub left: Vec<String>,
}

impl fmt::Display for PruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.removed.is_empty() {
            writeln!(f, "nothing of this state's network was left")?;
        }
        for r in &self.removed {
            writeln!(f, "removed {r}")?;
        }
        for l in &self.left {
            writeln!(f, "left alone: {l}")?;
        }
        Ok(())
    }
}

/// Remove this state's network objects. Taps of still-running VMs of this state are removed
/// too: stop the VMs first. The dnsmasq log is kept for post-mortems.
pub async fn prune(dirs: &Dirs) -> Result<PruneReport> {
    let files = NetFiles::new(dirs);
    let mut report = PruneReport::default();
    let saved: Option<NetConfig> = std::fs::read_to_string(files.config())
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());

    if let Some(pid) = dnsmasq::running_pid(&files) {
        dnsmasq::stop(&files)?;
        report.removed.push(format!("dnsmasq (pid {pid})"));
    }
    let owned = Owned::load(&files)?;
    report
        .removed
        .extend(super::network::remove_recorded(&files).await?);
    // The saved config's bridge, if it is there and this state has no record of making it (an
    // older boma-qvm, or someone else's): say so, never delete it.
    if let Some(cfg) = &saved {
        let rtnl = Rtnl::connect()?;
        if let Some(l) = rtnl.link(&cfg.bridge).await?
            && !bridge::is_recorded(&l, owned.bridge.as_ref())
            && l.kind == Some(InfoKind::Bridge)
        {
            let whose = match l.alias.as_deref().and_then(owned::marker_state) {
                Some(state) => format!("the network of another boma-qvm state ({state})"),
                None => format!(
                    "this state did not create it; if it is a leftover of an older boma-qvm, `ip link del {}`",
                    l.name
                ),
            };
            report.left.push(format!("bridge {}: {whose}", l.name));
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
