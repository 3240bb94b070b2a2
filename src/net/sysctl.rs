//! The few kernel knobs the network needs, written through /proc/sys (per network namespace).

use crate::Result;
use crate::error::IoContext;
use std::path::Path;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Is IPv4 forwarding on?
pub fn ip_forward_on() -> bool {
    std::fs::read_to_string(IP_FORWARD).is_ok_and(|s| s.trim() == "1")
}

/// Turn on IPv4 forwarding (the VMs' NAT needs it) and say so. When it was off, `marker` is
/// written: forwarding was ours, and `restore_ip_forward` turns it off again at teardown. When
/// it was on already (Docker, a router), it is not ours and stays on.
pub fn enable_ip_forward(marker: &Path) -> Result<()> {
    let now = std::fs::read_to_string(IP_FORWARD).ctx(|| format!("reading {IP_FORWARD}"))?;
    if now.trim() == "1" {
        tracing::info!("IPv4 forwarding (net.ipv4.ip_forward) already on");
    } else {
        std::fs::write(marker, "0\n").ctx(|| format!("writing {}", marker.display()))?;
        std::fs::write(IP_FORWARD, "1")
            .ctx(|| format!("writing 1 to {IP_FORWARD} (run as root)"))?;
        tracing::info!(
            "enabled IPv4 forwarding (net.ipv4.ip_forward=1) for the VMs' NAT; it goes off again with the network"
        );
    }
    Ok(())
}

/// Put forwarding back to 0 if `enable_ip_forward` turned it on (its marker says so).
pub fn restore_ip_forward(marker: &Path) -> Result<()> {
    if !marker.exists() {
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "0").ctx(|| format!("writing 0 to {IP_FORWARD}"))?;
    std::fs::remove_file(marker).ctx(|| format!("removing {}", marker.display()))?;
    tracing::info!("turned IPv4 forwarding off again (boma-qvm had turned it on)");
    Ok(())
}

/// The network is IPv4 only: no IPv6 (not even link-local) on our bridge. Best effort: the nft
/// table drops IPv6 from the bridge anyway.
pub fn disable_ipv6(bridge: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::debug!("could not disable IPv6 on {bridge} ({path}: {e})");
    }
}
