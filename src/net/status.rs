//! The network's state as `Network::status` reports it.

use std::fmt;
use std::net::Ipv4Addr;

use super::registry::VmNet;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DnsmasqState {
    Running(u32),
    /// Its pid file is there but the process is gone (or is not our dnsmasq): `up` restarts it.
    Died,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetStatus {
    pub bridge_name: String,
    /// `Some((is_up, IPv4 addresses))` when the bridge exists.
    pub bridge: Option<(bool, Vec<(Ipv4Addr, u8)>)>,
    pub table_loaded: bool,
    pub dnsmasq: DnsmasqState,
    pub ip_forward: bool,
    pub vms: Vec<VmNet>,
    /// Who runs the network: `None` for this process (root, directly), else the netd socket.
    #[serde(default)]
    pub via: Option<String>,
}

impl NetStatus {
    /// Everything the VMs need is in place.
    pub fn healthy(&self) -> bool {
        matches!(self.bridge, Some((true, _)))
            && self.table_loaded
            && matches!(self.dnsmasq, DnsmasqState::Running(_))
            && self.ip_forward
    }

    /// Nothing of ours is left (after `down`).
    pub fn is_down(&self) -> bool {
        self.bridge.is_none()
            && !self.table_loaded
            && !matches!(self.dnsmasq, DnsmasqState::Running(_))
    }
}

impl fmt::Display for NetStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.bridge {
            None => writeln!(f, "bridge   {}: absent", self.bridge_name)?,
            Some((up, addrs)) => {
                let a: Vec<String> = addrs.iter().map(|(ip, p)| format!("{ip}/{p}")).collect();
                writeln!(
                    f,
                    "bridge   {}: {} {}",
                    self.bridge_name,
                    if *up { "up" } else { "DOWN" },
                    a.join(" ")
                )?
            }
        }
        writeln!(
            f,
            "nft      table inet boma_qvm: {}",
            if self.table_loaded {
                "loaded"
            } else {
                "absent"
            }
        )?;
        match self.dnsmasq {
            DnsmasqState::Running(pid) => writeln!(f, "dnsmasq  running (pid {pid})")?,
            DnsmasqState::Died => writeln!(
                f,
                "dnsmasq  DIED (stale pid file); `boma-qvm net up` restarts it"
            )?,
            DnsmasqState::Stopped => writeln!(f, "dnsmasq  not running")?,
        }
        writeln!(
            f,
            "forward  net.ipv4.ip_forward={}",
            u8::from(self.ip_forward)
        )?;
        if let Some(via) = &self.via {
            writeln!(f, "netd     {via}")?;
        }
        for v in &self.vms {
            let names = if v.dns_names.is_empty() {
                String::new()
            } else {
                format!(" dns {}", v.dns_names.join(","))
            };
            let egress = if v.egress { "on" } else { "OFF" };
            let owner = match v.owner {
                Some(uid) => format!(" owner uid {uid}"),
                None => String::new(),
            };
            writeln!(
                f,
                "vm       {} {} {} egress {egress}{names}{owner}",
                v.name, v.mac, v.ip
            )?;
        }
        Ok(())
    }
}
