//! Deterministic per-VM identities derived from the VM name: MAC, tap name, IP address.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::config::NetConfig;
use crate::{Error, Result};

/// Prefix of every tap boma-qvm creates; `prune` removes links with it.
pub const TAP_PREFIX: &str = "bq-";

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for Mac {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::input(
                format!("`{s}` is not a MAC address"),
                "write it as 52:54:00:12:34:56",
            )
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

fn digest(name: &str) -> [u8; 32] {
    Sha256::digest(name.as_bytes()).into()
}

/// The VM's MAC: QEMU's locally administered `52:54:00` prefix plus three bytes of SHA-256(name).
pub fn mac_for(name: &str) -> Mac {
    let d = digest(name);
    Mac([0x52, 0x54, 0x00, d[0], d[1], d[2]])
}

/// The VM's tap name: `bq-` plus 8 hex digits of SHA-256(name) (11 chars, under the 15 limit).
pub fn tap_name_for(name: &str) -> String {
    format!("{TAP_PREFIX}{}", hex::encode(&digest(name)[..4]))
}

/// A stable address for the VM in the network's VM range: hash the name to a slot and probe
/// upwards past addresses in `taken` (those of other VMs). Errors when the range is full.
pub fn ip_for(name: &str, cfg: &NetConfig, taken: &[Ipv4Addr]) -> Result<Ipv4Addr> {
    let (first, last) = cfg.vm_range();
    let (first, last) = (u32::from(first), u32::from(last));
    let n = last - first + 1;
    let d = digest(name);
    let start = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) % n;
    (0..n)
        .map(|i| Ipv4Addr::from(first + (start + i) % n))
        .find(|ip| !taken.contains(ip))
        .ok_or_else(|| {
            Error::network(
                format!(
                    "no free VM address left in {} ({n} addresses, all taken)",
                    cfg.subnet
                ),
                "remove stale VMs with `boma-qvm prune`, or use a larger --subnet",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_stable_local_and_distinct() {
        let a = mac_for("boma-it-askari");
        assert_eq!(a, mac_for("boma-it-askari"));
        assert_ne!(a, mac_for("boma-it-other"));
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
        assert_eq!(a.0[0] & 0x02, 0x02, "locally administered");
        assert_eq!(a.0[0] & 0x01, 0, "unicast");
        assert_eq!(a.to_string().parse::<Mac>().unwrap(), a);
    }

    #[test]
    fn mac_parse_rejects_garbage() {
        for s in [
            "",
            "52:54:00:00:00",
            "52:54:00:00:00:00:00",
            "zz:54:00:00:00:00",
            "525:4:00:00:00:00",
        ] {
            assert!(s.parse::<Mac>().is_err(), "{s}");
        }
        assert_eq!(
            "52:54:00:AB:cd:0f".parse::<Mac>().unwrap().to_string(),
            "52:54:00:ab:cd:0f"
        );
    }

    #[test]
    fn tap_name_fits_and_is_stable() {
        let t = tap_name_for("boma-it-a-very-long-host-name-indeed");
        assert!(t.len() <= 15 && t.starts_with("bq-"), "{t}");
        assert_eq!(t, tap_name_for("boma-it-a-very-long-host-name-indeed"));
        assert_ne!(t, tap_name_for("boma-it-askari"));
    }

    #[test]
    fn ip_is_stable_in_range_and_avoids_taken() {
        let cfg = NetConfig::default();
        let (lo, hi) = cfg.vm_range();
        let ip = ip_for("boma-it-askari", &cfg, &[]).unwrap();
        assert!(ip >= lo && ip <= hi, "{ip}");
        assert_eq!(ip, ip_for("boma-it-askari", &cfg, &[]).unwrap());
        let other = ip_for("boma-it-askari", &cfg, &[ip]).unwrap();
        assert_ne!(other, ip);
        assert!(other >= lo && other <= hi);
    }

    #[test]
    fn ip_errors_when_range_is_full() {
        let cfg = NetConfig {
            subnet: "192.168.231.16/28".parse().unwrap(),
            ..NetConfig::default()
        };
        let (lo, hi) = cfg.vm_range();
        let all: Vec<Ipv4Addr> = (u32::from(lo)..=u32::from(hi))
            .map(Ipv4Addr::from)
            .collect();
        let e = ip_for("x", &cfg, &all).unwrap_err().to_string();
        assert!(e.contains("no free VM address"), "{e}");
        let spare = ip_for("x", &cfg, &all[1..]).unwrap();
        assert_eq!(spare, all[0]);
    }
}
