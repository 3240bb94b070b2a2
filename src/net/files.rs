//! The network's files under `Dirs::net()`.

use std::path::PathBuf;

use crate::error::IoContext;
use crate::paths::Dirs;
use crate::{Result, error::show};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetFiles {
    pub dir: PathBuf,
}

impl NetFiles {
    pub fn new(dirs: &Dirs) -> Self {
        NetFiles { dir: dirs.net() }
    }

    /// The `NetConfig` of the last `up` (so `prune`/`status` in another process find the bridge).
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    /// The rendered nftables ruleset last loaded.
    pub fn ruleset(&self) -> PathBuf {
        self.dir.join("boma_qvm.nft")
    }
    pub fn dnsmasq_conf(&self) -> PathBuf {
        self.dir.join("dnsmasq.conf")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("dnsmasq.pid")
    }
    /// dnsmasq's lease file (`wait_for_lease` reads it).
    /// Present while IPv4 forwarding is on because we turned it on.
    pub fn ip_forward_marker(&self) -> PathBuf {
        self.dir.join("ip_forward.ours")
    }
    pub fn leases(&self) -> PathBuf {
        self.dir.join("dnsmasq.leases")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("dnsmasq.log")
    }
    /// `dhcp-hostsfile`: one `MAC,IP,name` static lease per VM (re-read on SIGHUP).
    pub fn dhcp_hosts(&self) -> PathBuf {
        self.dir.join("dhcp-hosts")
    }
    /// `addn-hosts`: local DNS answers, `IP name...` per VM (re-read on SIGHUP).
    pub fn hosts(&self) -> PathBuf {
        self.dir.join("hosts")
    }
    /// `servers-file`: upstream DNS servers, empty while egress is off (re-read on SIGHUP).
    pub fn servers(&self) -> PathBuf {
        self.dir.join("servers.conf")
    }
    /// What this state created (bridge, table, taps, veths): see `owned`.
    pub fn owned(&self) -> PathBuf {
        self.dir.join("owned.json")
    }
    /// Serialises changes to `owned.json` between processes.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
    /// One JSON file per registered VM: the source of truth the files above are rendered from.
    pub fn vms(&self) -> PathBuf {
        self.dir.join("vms")
    }
    pub fn vm(&self, name: &str) -> PathBuf {
        self.vms().join(format!("{name}.json"))
    }

    pub fn create_dirs(&self) -> Result<()> {
        std::fs::create_dir_all(self.vms()).ctx(|| format!("creating {}", show(&self.vms())))
    }
}
