//! The registered VMs of the network (one JSON file each) and the dnsmasq files rendered from
//! them: static leases (`dhcp-hostsfile`) and local DNS answers (`addn-hosts`).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::files::NetFiles;
use super::ident::Mac;
use crate::error::IoContext;
use crate::paths::{write_atomic, write_atomic_mode};
use crate::{Error, Result, error::show};

/// A VM's place on the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNet {
    /// VM name (e.g. `boma-it-askari`); also its DHCP host name when it is a valid DNS label.
    pub name: String,
    pub mac: Mac,
    /// Pinned by a static lease.
    pub ip: Ipv4Addr,
    /// Names dnsmasq answers with `ip` (the mirrored host's public names, e.g. `askari.wingu.me`).
    pub dns_names: Vec<String>,
    /// Outbound traffic beyond the subnet (masquerade) allowed.
    pub egress: bool,
    /// The uid that registered it through netd (only it, and root, may act on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
    /// The state directory of the VM behind it (for netd's per-state prune).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<std::path::PathBuf>,
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl VmNet {
    /// Refuse names that would corrupt dnsmasq's files or a registry path.
    pub fn validate(&self) -> Result<()> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !self.name.starts_with('.');
        if !name_ok {
            return Err(Error::input(
                format!("VM name `{}` is not usable on the network", self.name),
                "use 1-64 characters from A-Z a-z 0-9 - _ . (not starting with a dot)",
            ));
        }
        if let Some(bad) = self.dns_names.iter().find(|n| !is_dns_name(n)) {
            return Err(Error::input(
                format!(
                    "`{bad}` (a DNS name of VM {}) is not a valid DNS name",
                    self.name
                ),
                "use dot-separated labels of letters, digits and hyphens, e.g. askari.wingu.me",
            ));
        }
        Ok(())
    }

    /// The `dhcp-hostsfile` line: MAC, pinned IP and (if it is a valid label) the host name.
    pub fn dhcp_host_line(&self) -> String {
        if is_dns_name(&self.name) && !self.name.contains('.') {
            format!("{},{},{}", self.mac, self.ip, self.name)
        } else {
            format!("{},{}", self.mac, self.ip)
        }
    }

    /// The `addn-hosts` line, or `None` when the VM has no DNS names.
    pub fn hosts_line(&self) -> Option<String> {
        (!self.dns_names.is_empty()).then(|| format!("{} {}", self.ip, self.dns_names.join(" ")))
    }
}

/// All registered VMs, sorted by name.
pub fn load_all(files: &NetFiles) -> Result<Vec<VmNet>> {
    let dir = files.vms();
    let mut vms = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vms),
        Err(e) => {
            return Err(Error::Io {
                context: format!("reading {}", show(&dir)),
                source: e,
            });
        }
    };
    for entry in entries {
        let path = entry.ctx(|| format!("reading {}", show(&dir)))?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).ctx(|| format!("reading {}", show(&path)))?;
        let vm: VmNet = serde_json::from_str(&text).map_err(|e| {
            Error::network(
                format!("corrupt VM network record {}: {e}", show(&path)),
                "remove it, or run `boma-qvm prune` to reset the network",
            )
        })?;
        vms.push(vm);
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(vms)
}

pub fn save(files: &NetFiles, vm: &VmNet) -> Result<()> {
    files.create_dirs()?;
    let text = serde_json::to_string_pretty(vm).expect("VmNet serializes");
    write_atomic(&files.vm(&vm.name), &text)
}

/// Remove a VM's record; returns it if there was one.
pub fn remove(files: &NetFiles, name: &str) -> Result<Option<VmNet>> {
    let vm = load_all(files)?.into_iter().find(|v| v.name == name);
    let path = files.vm(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(vm),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            context: format!("removing {}", show(&path)),
            source: e,
        }),
    }
}

/// Render `dhcp-hosts` and `hosts` from the registry.
pub fn write_dnsmasq_files(files: &NetFiles, vms: &[VmNet]) -> Result<()> {
    let header = "# generated by boma-qvm from the VM records in vms/; edits are lost\n";
    let dhcp: String = vms.iter().map(|v| v.dhcp_host_line() + "\n").collect();
    let hosts: String = vms
        .iter()
        .filter_map(|v| v.hosts_line())
        .map(|l| l + "\n")
        .collect();
    // 0644 whatever the umask: dnsmasq re-reads them as `nobody`. VM names, MACs and
    // addresses, not secrets.
    write_atomic_mode(&files.dhcp_hosts(), format!("{header}{dhcp}"), 0o644)?;
    write_atomic_mode(&files.hosts(), format!("{header}{hosts}"), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmNet {
        VmNet {
            name: name.into(),
            mac: "52:54:00:aa:bb:cc".parse().unwrap(),
            ip: "192.168.231.23".parse().unwrap(),
            dns_names: vec!["askari.wingu.me".into(), "coord.wingu.me".into()],
            egress: true,
            owner: None,
            state: None,
        }
    }

    #[test]
    fn lines_for_dnsmasq() {
        let v = vm("boma-it-askari");
        assert_eq!(
            v.dhcp_host_line(),
            "52:54:00:aa:bb:cc,192.168.231.23,boma-it-askari"
        );
        assert_eq!(
            v.hosts_line().unwrap(),
            "192.168.231.23 askari.wingu.me coord.wingu.me"
        );
        assert_eq!(
            vm("odd_name").dhcp_host_line(),
            "52:54:00:aa:bb:cc,192.168.231.23"
        );
        let none = VmNet {
            dns_names: vec![],
            ..vm("a")
        };
        assert_eq!(none.hosts_line(), None);
    }

    #[test]
    fn validation_refuses_injection() {
        vm("boma-it-askari").validate().unwrap();
        for bad in ["", "../x", "a b", "a\nb", ".hidden"] {
            assert!(vm(bad).validate().is_err(), "{bad:?}");
        }
        for bad in ["a b", "x\nserver=1.2.3.4", "-x.com", "a..b", ""] {
            let v = VmNet {
                dns_names: vec![bad.into()],
                ..vm("a")
            };
            assert!(v.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn registry_round_trip_and_render() {
        let tmp = tempfile::tempdir().unwrap();
        let files = NetFiles {
            dir: tmp.path().to_path_buf(),
        };
        assert!(load_all(&files).unwrap().is_empty());
        save(&files, &vm("b")).unwrap();
        save(
            &files,
            &VmNet {
                egress: false,
                ..vm("a")
            },
        )
        .unwrap();
        let all = load_all(&files).unwrap();
        assert_eq!(
            all.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(!all[0].egress);
        write_dnsmasq_files(&files, &all).unwrap();
        let dhcp = std::fs::read_to_string(files.dhcp_hosts()).unwrap();
        assert_eq!(dhcp.lines().filter(|l| !l.starts_with('#')).count(), 2);
        assert_eq!(remove(&files, "a").unwrap().unwrap().name, "a");
        assert_eq!(remove(&files, "a").unwrap(), None);
        assert_eq!(load_all(&files).unwrap().len(), 1);
    }
}
