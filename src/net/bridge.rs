//! The VM bridge: created, addressed and brought up idempotently; refused when its subnet would
//! overlap a route already on the host or when a bridge of that name has another address.

use std::net::Ipv4Addr;

use rtnetlink::packet_route::link::InfoKind;
use rtnetlink::packet_route::route::RouteType;
use sha2::{Digest, Sha256};

use super::config::NetConfig;
use super::rtnl::{Route, Rtnl};
use super::subnet::Subnet;
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
            super::sysctl::disable_ipv6(&cfg.bridge);
            rtnl.add_ipv4(link.index, gw, prefix).await?;
            (link.index, true)
        }
    };
    rtnl.set_up(index).await?;
    Ok((index, created))
}

/// Error if any IPv4 route on the host (any table; not the default route, not our own bridge's)
/// overlaps the configured subnet. The fix names a subnet that is free on this host.
pub async fn refuse_overlapping_routes(
    rtnl: &Rtnl,
    cfg: &NetConfig,
    own: Option<u32>,
) -> Result<()> {
    let routes: Vec<Route> = rtnl
        .routes_v4()
        .await?
        .into_iter()
        .filter(|r| {
            r.dst.prefix() != 0
                && r.kind != RouteType::Multicast
                && !(own.is_some() && r.oif == own)
        })
        .collect();
    let Some(r) = routes.iter().find(|r| r.dst.overlaps(&cfg.subnet)) else {
        return Ok(());
    };
    let dev = match r.oif {
        Some(i) => format!(" dev {}", rtnl.link_name(i).await?),
        None => String::new(),
    };
    let taken: Vec<Subnet> = routes.iter().map(|r| r.dst).collect();
    let suggestion = match free_subnet(&taken) {
        Some(s) => format!("e.g. --subnet {s}, which is free here"),
        None => "e.g. an unused /24 inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16".to_string(),
    };
    Err(Error::network(
        format!(
            "subnet {} overlaps the route {}{dev} (table {}) already on this host",
            cfg.subnet, r.dst, r.table
        ),
        format!(
            "choose a free subnet for the VM network ({suggestion}); boma-qvm never changes the host's own routes"
        ),
    ))
}

/// The first /24 of a few private candidates that overlaps no route in `taken` and no reserved range.
pub fn free_subnet(taken: &[Subnet]) -> Option<Subnet> {
    let candidates = (231..=254u8)
        .map(|b| Ipv4Addr::new(192, 168, b, 0))
        .chain((16..=31u8).map(|b| Ipv4Addr::new(172, b, 231, 0)))
        .chain((231..=254u8).map(|b| Ipv4Addr::new(10, b, 0, 0)));
    candidates.map(|a| Subnet::containing(a, 24)).find(|c| {
        let cfg = NetConfig {
            subnet: *c,
            ..NetConfig::default()
        };
        cfg.validate().is_ok() && !taken.iter().any(|t| t.overlaps(c))
    })
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
    fn free_subnet_skips_taken_and_reserved() {
        let sn = |s: &str| s.parse::<Subnet>().unwrap();
        assert_eq!(free_subnet(&[]), Some(sn("192.168.231.0/24")));
        assert_eq!(
            free_subnet(&[sn("192.168.231.0/24")]),
            Some(sn("192.168.232.0/24"))
        );
        assert_eq!(
            free_subnet(&[sn("192.168.0.0/16")]),
            Some(sn("172.16.231.0/24"))
        );
        assert_eq!(
            free_subnet(&[sn("192.168.0.0/16"), sn("172.16.0.0/12")]),
            Some(sn("10.231.0.0/24"))
        );
        assert_eq!(
            free_subnet(&[sn("10.0.0.0/8"), sn("172.16.0.0/12"), sn("192.168.0.0/16")]),
            None
        );
    }

    #[test]
    fn bridge_mac_is_local_unicast_and_stable() {
        let m = bridge_mac("boma-qvm0");
        assert_eq!(m, bridge_mac("boma-qvm0"));
        assert_eq!(m[0], 0x02);
        assert_ne!(m, bridge_mac("boma-qvm1"));
    }
}
