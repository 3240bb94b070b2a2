//! The network's configuration: bridge name, subnet, upstream DNS; validation of both.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::subnet::Subnet;
use crate::{Error, Result};

/// Default bridge name. Taps use the `bq-` prefix, so the two never collide.
pub const DEFAULT_BRIDGE: &str = "boma-qvm0";
/// Default subnet: private, and clear of the LAN and the mesh (see `RESERVED`).
pub const DEFAULT_SUBNET: &str = "192.168.231.0/24";
/// Ranges our subnet must never overlap, whatever the host's routes say right now:
/// the LAN (10.20.0.0/16) and the mesh's CGNAT range (100.64.0.0/10).
pub const RESERVED: &[(&str, &str)] = &[
    ("10.20.0.0/16", "the LAN"),
    ("100.64.0.0/10", "the mesh (CGNAT)"),
];
/// The private ranges a subnet must lie in (RFC 1918).
const PRIVATE: &[&str] = &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"];
/// First host offset handed to VMs in subnets of 64+ addresses; .1 is the bridge, .2-.9 are for
/// confined control-node processes.
const FIRST_VM_OFFSET: u32 = 10;
/// Confinement addresses at the top of a tiny subnet.
const TINY_CONFINE: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Bridge interface name (<= 15 characters).
    pub bridge: String,
    /// The VMs' subnet; the bridge (host side) takes its `.1`.
    pub subnet: Subnet,
    /// Upstream DNS servers dnsmasq forwards to while egress is on.
    /// `None`: the host's `/etc/resolv.conf` nameservers.
    pub upstream_dns: Option<Vec<std::net::IpAddr>>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            bridge: DEFAULT_BRIDGE.to_string(),
            subnet: DEFAULT_SUBNET.parse().expect("default subnet parses"),
            upstream_dns: None,
        }
    }
}

impl NetConfig {
    /// The host's address on the bridge: the subnet's `.1`.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.host(1).expect("validated subnet has a .1")
    }

    /// Addresses VMs get (inclusive): from `.10` to broadcast - 1; in tiny subnets (under 64
    /// addresses) from `.2` up to the confinement range at the top.
    pub fn vm_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        let size = self.subnet.size() as u32;
        let (first, last) = if size >= 64 {
            (FIRST_VM_OFFSET, size - 2)
        } else {
            (2, size - 2 - TINY_CONFINE)
        };
        (
            self.subnet.host(first).unwrap(),
            self.subnet.host(last).unwrap(),
        )
    }

    /// Addresses for confined control-node processes (`boma-qvm __confined`, one per running
    /// playbook), inclusive: `.2`-`.9`, which VMs never get and DHCP never hands out (it serves
    /// static leases only); in tiny subnets the top four host addresses. Our nft table lets them
    /// reach the VM subnet and nothing else, not even the host.
    pub fn confine_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        let size = self.subnet.size() as u32;
        let (first, last) = if size >= 64 {
            (2, FIRST_VM_OFFSET - 1)
        } else {
            (size - 1 - TINY_CONFINE, size - 2)
        };
        (
            self.subnet.host(first).unwrap(),
            self.subnet.host(last).unwrap(),
        )
    }

    /// Refuse names and subnets that cannot work or would collide with the LAN or the mesh.
    pub fn validate(&self) -> Result<()> {
        validate_ifname(&self.bridge, "bridge")?;
        if self.bridge.starts_with(super::ident::TAP_PREFIX) {
            return Err(Error::input(
                format!(
                    "bridge name `{}` uses the tap prefix `{}`",
                    self.bridge,
                    super::ident::TAP_PREFIX
                ),
                format!("pick another bridge name, e.g. {DEFAULT_BRIDGE}"),
            ));
        }
        let s = self.subnet;
        if !(16..=28).contains(&s.prefix()) {
            return Err(Error::input(
                format!("subnet {s} has prefix /{}, outside /16../28", s.prefix()),
                "use a subnet between /16 and /28, e.g. 192.168.231.0/24",
            ));
        }
        for (r, what) in RESERVED {
            let r: Subnet = r.parse().unwrap();
            if r.overlaps(&s) {
                return Err(Error::input(
                    format!("subnet {s} overlaps {r} ({what}); VMs must never be routed into it"),
                    "use a subnet clear of it, e.g. 192.168.231.0/24",
                ));
            }
        }
        let private: Vec<Subnet> = PRIVATE.iter().map(|p| p.parse().unwrap()).collect();
        if !private
            .iter()
            .any(|p| p.overlaps(&s) && p.prefix() <= s.prefix())
        {
            return Err(Error::input(
                format!("subnet {s} is not a private (RFC 1918) range"),
                "use a subnet inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16, e.g. 192.168.231.0/24",
            ));
        }
        Ok(())
    }
}

/// Linux interface names: 1..=15 bytes of `[A-Za-z0-9_.-]`.
pub fn validate_ifname(name: &str, what: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::input(
            format!("{what} name `{name}` is not a valid interface name"),
            "use 1-15 characters from A-Z a-z 0-9 _ . -",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_subnet(s: &str) -> NetConfig {
        NetConfig {
            subnet: s.parse().unwrap(),
            ..NetConfig::default()
        }
    }

    #[test]
    fn default_is_valid_with_gateway_dot_one() {
        let c = NetConfig::default();
        c.validate().unwrap();
        assert_eq!(c.bridge, "boma-qvm0");
        assert_eq!(c.gateway(), Ipv4Addr::new(192, 168, 231, 1));
        assert_eq!(
            c.vm_range(),
            (
                Ipv4Addr::new(192, 168, 231, 10),
                Ipv4Addr::new(192, 168, 231, 254)
            )
        );
    }

    #[test]
    fn refuses_lan_mesh_public_and_odd_sizes() {
        for (s, needle) in [
            ("10.20.7.0/24", "the LAN"),
            ("10.0.0.0/8", "outside /16../28"),
            ("10.16.0.0/12", "outside /16../28"),
            ("100.64.1.0/24", "the mesh"),
            ("8.8.8.0/24", "not a private"),
            ("192.168.231.0/30", "outside /16../28"),
        ] {
            let e = with_subnet(s).validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{s}: {e}");
            assert!(e.contains("fix:"), "{e}");
        }
        with_subnet("172.20.1.0/24").validate().unwrap();
        with_subnet("10.21.0.0/16").validate().unwrap();
        let tiny = with_subnet("192.168.231.16/28");
        tiny.validate().unwrap();
        assert_eq!(
            tiny.vm_range(),
            (
                Ipv4Addr::new(192, 168, 231, 18),
                Ipv4Addr::new(192, 168, 231, 26)
            )
        );
        assert_eq!(
            tiny.confine_range(),
            (
                Ipv4Addr::new(192, 168, 231, 27),
                Ipv4Addr::new(192, 168, 231, 30)
            )
        );
        let c = NetConfig::default();
        assert_eq!(
            c.confine_range(),
            (
                Ipv4Addr::new(192, 168, 231, 2),
                Ipv4Addr::new(192, 168, 231, 9)
            ),
            "below the VMs' .10 and above the bridge's .1"
        );
    }

    #[test]
    fn refuses_bad_bridge_names() {
        for b in ["", "this-name-is-too-long", "br 0", "bq-x"] {
            let c = NetConfig {
                bridge: b.into(),
                ..NetConfig::default()
            };
            assert!(c.validate().is_err(), "{b:?}");
        }
    }
}
