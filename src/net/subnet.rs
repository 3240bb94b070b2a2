//! IPv4 subnet math: parsing `a.b.c.d/len`, containment, overlap, host addresses.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::{Error, Result};

/// An IPv4 network in CIDR form. The address is always the network address (host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// A subnet from a network address and prefix length. Refuses host bits set
    /// (`192.168.231.5/24`) so a typo is not silently widened or moved.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self> {
        if prefix > 32 {
            return Err(Error::input(
                format!("prefix length /{prefix} is larger than 32"),
                "use a prefix between /16 and /28, e.g. 192.168.231.0/24",
            ));
        }
        let s = Subnet {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        };
        if s.network != addr {
            return Err(Error::input(
                format!("{addr}/{prefix} has host bits set"),
                format!("use the network address: {s}"),
            ));
        }
        Ok(s)
    }

    /// Like `new` but masks host bits away (for routes read from the kernel).
    pub fn containing(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        Subnet {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// Number of addresses in the subnet (including network and broadcast).
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }

    /// The `n`-th address of the subnet (`host(1)` is the conventional gateway), if inside it.
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        (u64::from(n) < self.size()).then(|| Ipv4Addr::from(u32::from(self.network) + n))
    }

    /// Offset of `ip` inside the subnet, if it is inside.
    pub fn offset(&self, ip: Ipv4Addr) -> Option<u32> {
        self.contains(ip)
            .then(|| u32::from(ip) - u32::from(self.network))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }

    /// True when the two networks share at least one address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let p = self.prefix.min(other.prefix);
        u32::from(self.network) & mask(p) == u32::from(other.network) & mask(p)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::input(
                format!("`{s}` is not an IPv4 subnet in CIDR form"),
                "write it as address/prefix, e.g. 192.168.231.0/24",
            )
        };
        let (a, p) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        Subnet::new(addr, prefix)
    }
}

impl serde::Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_derives_addresses() {
        let s = sn("192.168.231.0/24");
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.broadcast(), Ipv4Addr::new(192, 168, 231, 255));
        assert_eq!(s.host(1), Some(Ipv4Addr::new(192, 168, 231, 1)));
        assert_eq!(s.host(256), None);
        assert_eq!(s.size(), 256);
        assert_eq!(s.offset(Ipv4Addr::new(192, 168, 231, 77)), Some(77));
        assert_eq!(s.offset(Ipv4Addr::new(192, 168, 232, 1)), None);
        assert_eq!(s.to_string(), "192.168.231.0/24");
    }

    #[test]
    fn refuses_host_bits_and_garbage() {
        let e = "192.168.231.5/24"
            .parse::<Subnet>()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host bits") && e.contains("192.168.231.0/24"),
            "{e}"
        );
        assert!("192.168.231.0".parse::<Subnet>().is_err());
        assert!("192.168.231.0/33".parse::<Subnet>().is_err());
        assert!("nonsense/24".parse::<Subnet>().is_err());
    }

    #[test]
    fn overlap_is_symmetric_and_prefix_aware() {
        let lan = sn("10.20.0.0/16");
        assert!(lan.overlaps(&sn("10.20.5.0/24")));
        assert!(sn("10.20.5.0/24").overlaps(&lan));
        assert!(sn("10.0.0.0/8").overlaps(&lan));
        assert!(!lan.overlaps(&sn("10.21.0.0/16")));
        assert!(sn("100.64.0.0/10").overlaps(&sn("100.127.255.0/24")));
        assert!(!sn("100.64.0.0/10").overlaps(&sn("100.128.0.0/24")));
        assert!(sn("0.0.0.0/0").overlaps(&lan));
        assert!(
            Subnet::containing(Ipv4Addr::new(192, 168, 231, 1), 32)
                .overlaps(&sn("192.168.231.0/24"))
        );
    }

    #[test]
    fn serde_round_trip() {
        let s = sn("192.168.231.0/24");
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, "\"192.168.231.0/24\"");
        assert_eq!(serde_json::from_str::<Subnet>(&j).unwrap(), s);
    }
}
