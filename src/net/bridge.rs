//! The VM bridge: created, addressed and brought up idempotently; refused when its subnet would
//! overlap a route already on the host, and whenever a link of that name exists that this state
//! did not create (never adopted, never changed, never deleted).

use std::net::Ipv4Addr;

use rtnetlink::packet_route::link::InfoKind;
use rtnetlink::packet_route::route::RouteType;
use sha2::{Digest, Sha256};

use super::config::{DEFAULT_BRIDGE, NetConfig};
use super::owned::{LinkRecord, marker_state};
use super::rtnl::{Link, Route, Rtnl};
use super::subnet::Subnet;
use crate::{Error, Result};

/// The bridge's fixed MAC: locally administered `02:` plus 5 bytes of SHA-256(bridge name).
pub fn bridge_mac(name: &str) -> [u8; 6] {
    let d = Sha256::digest(name.as_bytes());
    [0x02, d[0], d[1], d[2], d[3], d[4]]
}

/// Is `link` the bridge `rec` recorded (same name, same ifindex, still a bridge)?
pub fn is_recorded(link: &Link, rec: Option<&LinkRecord>) -> bool {
    rec.is_some_and(|r| r.name == link.name && r.ifindex == link.index)
        && link.kind == Some(InfoKind::Bridge)
}

/// Before anything is made: the bridge `cfg` names is either absent, or this state's own (as
/// `owned` recorded it) with the gateway address. Any other link of that name is refused, with
/// whose it is when the alias says another boma-qvm state made it. Changes nothing.
/// Returns the existing own bridge.
pub async fn check(
    rtnl: &Rtnl,
    cfg: &NetConfig,
    owned: Option<&LinkRecord>,
) -> Result<Option<Link>> {
    let Some(link) = rtnl.link(&cfg.bridge).await? else {
        refuse_overlapping_routes(rtnl, cfg, None).await?;
        return Ok(None);
    };
    if !is_recorded(&link, owned) {
        return Err(foreign(&link));
    }
    let gw = cfg.gateway();
    let prefix = cfg.subnet.prefix();
    let addrs = rtnl.ipv4_addrs(link.index).await?;
    let wrong: Vec<String> = addrs
        .iter()
        .filter(|a| **a != (gw, prefix))
        .map(|(ip, p)| format!("{ip}/{p}"))
        .collect();
    if !wrong.is_empty() {
        return Err(Error::network(
            format!(
                "this state's bridge {} has address {}, not {gw}/{prefix} (its network was made with another subnet)",
                cfg.bridge,
                wrong.join(", ")
            ),
            "take it down first (`boma-qvm net down`, or `boma-qvm prune`), then bring it up with the new subnet",
        ));
    }
    if addrs.is_empty() {
        refuse_overlapping_routes(rtnl, cfg, Some(link.index)).await?;
    }
    Ok(Some(link))
}

/// The refusal for a link of our bridge's name that this state did not make.
pub fn foreign(link: &Link) -> Error {
    let name = &link.name;
    if let Some(state) = link.alias.as_deref().and_then(marker_state) {
        return Error::network(
            format!(
                "bridge {name} is the network of another boma-qvm state ({state}), not of this one"
            ),
            format!(
                "two state directories cannot run a network in one network namespace: use that \
                 state (BOMA_QVM_STATE_DIR={}), or boma-qvm netd (one network shared safely by \
                 every user), or another network namespace",
                state.strip_suffix("/net").unwrap_or(state)
            ),
        );
    }
    if link.kind != Some(InfoKind::Bridge) {
        return Error::network(
            format!(
                "interface {name} exists and is not a bridge (kind {})",
                link.kind
                    .as_ref()
                    .map(|k| format!("{k:?}").to_lowercase())
                    .unwrap_or_else(|| "unknown".into())
            ),
            format!(
                "choose another --bridge name (the default {DEFAULT_BRIDGE} is boma-qvm's own); \
                 boma-qvm never touches an interface it did not create"
            ),
        );
    }
    Error::network(
        format!("bridge {name} exists and boma-qvm did not create it"),
        format!(
            "boma-qvm never adopts, changes or deletes a bridge it did not make: choose another \
             --bridge name (the default {DEFAULT_BRIDGE} is boma-qvm's own); if {name} is a \
             leftover of an older boma-qvm, delete it yourself (`ip link del {name}`)"
        ),
    )
}

/// Make sure our bridge exists with the gateway address and is up (after `check` passed).
/// Returns its ifindex, and its record when it was created just now (the caller saves it).
pub async fn ensure(
    rtnl: &Rtnl,
    cfg: &NetConfig,
    existing: Option<Link>,
    marker: &str,
) -> Result<(u32, Option<LinkRecord>)> {
    let gw = cfg.gateway();
    let prefix = cfg.subnet.prefix();
    let (index, created) = match existing {
        Some(link) => {
            if rtnl.ipv4_addrs(link.index).await?.is_empty() {
                rtnl.add_ipv4(link.index, gw, prefix).await?;
            }
            (link.index, None)
        }
        None => {
            rtnl.add_bridge(&cfg.bridge, bridge_mac(&cfg.bridge))
                .await?;
            let link = rtnl.link(&cfg.bridge).await?.ok_or_else(|| {
                Error::network(
                    format!("bridge {} vanished right after creation", cfg.bridge),
                    "retry `boma-qvm net up`",
                )
            })?;
            let rec = LinkRecord {
                name: link.name.clone(),
                ifindex: link.index,
                owner: None,
            };
            rtnl.set_alias(link.index, marker).await?;
            super::sysctl::disable_ipv6(&cfg.bridge);
            rtnl.add_ipv4(link.index, gw, prefix).await?;
            (link.index, Some(rec))
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

/// Delete the recorded bridge if it still exists as recorded (same name, same ifindex, a
/// bridge). A link of that name that is not the recorded one is left alone. Returns whether
/// it was deleted.
pub async fn delete(rtnl: &Rtnl, rec: &LinkRecord) -> Result<bool> {
    match rtnl.link(&rec.name).await? {
        Some(l) if is_recorded(&l, Some(rec)) => {
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
