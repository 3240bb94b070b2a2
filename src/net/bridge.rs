//! The VM bridge: created, addressed and brought up idempotently; refused when its subnet would
//! overlap a route already on the host or when a bridge of that name has another address.

use rtnetlink::packet_route::link::InfoKind;
use rtnetlink::packet_route::route::RouteType;
use sha2::{Digest, Sha256};

use super::config::NetConfig;
use super::rtnl::Rtnl;
use crate::{Error, Result};

/// The bridge's fixed MAC: locally administered `02:` plus 5 bytes of SHA-256(bridge name).
pub fn bridge_mac(name: &str) -> [u8; 6] {
    let d = Sha256::digest(name.as_bytes());
    [0x02, d[0], d[1], d[2], d[3], d[4]]
}

/// Make sure the bridge exists with the gateway address and is up; returns its ifindex.
/// Returns whether it was created (for the log) as the second value.
pub async fn ensure(rtnl: &Rtnl, cfg: &NetConfig) -> Result<(u32, bool)> {
    let gw = cfg.gateway();
    let prefix = cfg.subnet.prefix();
    let (index, created) = match rtnl.link(&cfg.bridge).await? {
        Some(link) => {
            if link.kind != Some(InfoKind::Bridge) {
                return Err(Error::network(
                    format!(
                        "interface {} exists but is not a bridge (kind {:?})",
                        cfg.bridge, link.kind
                    ),
                    format!(
                        "choose another bridge name, or remove it if it is a leftover (`ip link del {}`)",
                        cfg.bridge
                    ),
                ));
            }
            let addrs = rtnl.ipv4_addrs(link.index).await?;
            let wrong: Vec<String> = addrs
                .iter()
                .filter(|a| **a != (gw, prefix))
                .map(|(ip, p)| format!("{ip}/{p}"))
                .collect();
            if !wrong.is_empty() {
                return Err(Error::network(
                    format!(
                        "bridge {} already exists with address {}, not {gw}/{prefix}",
                        cfg.bridge,
                        wrong.join(", ")
                    ),
                    format!(
                        "if it is boma-qvm's own from a run with another subnet, run `boma-qvm prune`; \
                         otherwise choose another bridge name than {}",
                        cfg.bridge
                    ),
                ));
            }
            if addrs.is_empty() {
                refuse_overlapping_routes(rtnl, cfg, Some(link.index)).await?;
                rtnl.add_ipv4(link.index, gw, prefix).await?;
            }
            (link.index, false)
        }
        None => {
            refuse_overlapping_routes(rtnl, cfg, None).await?;
            rtnl.add_bridge(&cfg.bridge, bridge_mac(&cfg.bridge))
                .await?;
            let link = rtnl.link(&cfg.bridge).await?.ok_or_else(|| {
                Error::network(
                    format!("bridge {} vanished right after creation", cfg.bridge),
                    "retry `boma-qvm net up`",
                )
            })?;
            disable_ipv6(&cfg.bridge);
            rtnl.add_ipv4(link.index, gw, prefix).await?;
            (link.index, true)
        }
    };
    rtnl.set_up(index).await?;
    Ok((index, created))
}

/// The network is IPv4 only: no IPv6 (not even link-local) on our bridge.
fn disable_ipv6(bridge: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::debug!(
            "could not disable IPv6 on {bridge} ({path}: {e}); the nft table drops it anyway"
        );
    }
}

/// Error if any IPv4 route on the host (any table; not the default route, not our own bridge's)
/// overlaps the configured subnet.
pub async fn refuse_overlapping_routes(
    rtnl: &Rtnl,
    cfg: &NetConfig,
    own: Option<u32>,
) -> Result<()> {
    for r in rtnl.routes_v4().await? {
        if r.dst.prefix() == 0 || r.kind == RouteType::Multicast || (own.is_some() && r.oif == own)
        {
            continue;
        }
        if r.dst.overlaps(&cfg.subnet) {
            let dev = match r.oif {
                Some(i) => format!(" dev {}", rtnl.link_name(i).await?),
                None => String::new(),
            };
            return Err(Error::network(
                format!(
                    "subnet {} overlaps the route {}{dev} (table {}) already on this host",
                    cfg.subnet, r.dst, r.table
                ),
                "choose a free subnet for the VM network (e.g. --subnet 192.168.232.0/24); \
                 boma-qvm never changes the host's own routes",
            ));
        }
    }
    Ok(())
}

/// Delete the bridge if it exists (only a bridge; anything else of that name is left alone).
pub async fn delete(rtnl: &Rtnl, name: &str) -> Result<bool> {
    match rtnl.link(name).await? {
        Some(l) if l.kind == Some(InfoKind::Bridge) => {
            rtnl.delete(l.index).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_mac_is_local_unicast_and_stable() {
        let m = bridge_mac("boma-qvm0");
        assert_eq!(m, bridge_mac("boma-qvm0"));
        assert_eq!(m[0], 0x02);
        assert_ne!(m, bridge_mac("boma-qvm1"));
    }
}
