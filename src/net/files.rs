//! The network's files under `Dirs::net()`.

use std::path::PathBuf;

use crate::error::IoContext;
use crate::paths::Dirs;
use crate::{Result, error::show};

/// The files dnsmasq re-reads after it dropped its privileges (measured with strace: at start
/// and on SIGHUP it opens only these; its pid file, log and lease file are opened as root
/// before the drop and kept open).
pub const DHCP_HOSTS: &str = "dhcp-hosts";
pub const HOSTS: &str = "hosts";
pub const SERVERS: &str = "servers.conf";

/// `NetFiles::public_dir` without its ID.
pub const PUBLIC_DIR_PREFIX: &str = "/run/boma-qvm-dnsmasq-";

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
        self.reread_dir().join(DHCP_HOSTS)
    }
    /// `addn-hosts`: local DNS answers, `IP name...` per VM (re-read on SIGHUP).
    pub fn hosts(&self) -> PathBuf {
        self.reread_dir().join(HOSTS)
    }
    /// `servers-file`: upstream DNS servers, empty while egress is off (re-read on SIGHUP).
    pub fn servers(&self) -> PathBuf {
        self.reread_dir().join(SERVERS)
    }
    /// Where the three files above are: the directory under /run this state made for them
    /// (recorded in `owned.json`, and still ours), else `dir`. See `dnsmasq::run_as`.
    pub fn reread_dir(&self) -> PathBuf {
        super::dnsmasq::recorded_public_dir(self).unwrap_or_else(|| self.dir.clone())
    }
    /// The directory root makes for the three files above when `dir` is private: under /run,
    /// named after a hash of `dir`, so every process of this state (and no other state) finds
    /// the same one. Not netd's /run/boma-qvm (its mode and group are netd's).
    pub fn public_dir(&self) -> PathBuf {
        use sha2::Digest;
        use std::os::unix::ffi::OsStrExt;
        let h = sha2::Sha256::digest(self.dir.as_os_str().as_bytes());
        PathBuf::from(format!("{PUBLIC_DIR_PREFIX}{}", hex::encode(&h[..8])))
    }
    /// What this state created (bridge, table, taps, veths, dnsmasq's directory under /run):
    /// see `owned`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_dir_is_per_state_and_not_netds() {
        let a = NetFiles {
            dir: "/root/.local/state/boma-qvm/net".into(),
        };
        let b = NetFiles {
            dir: "/tmp/bqx/state/net".into(),
        };
        assert_eq!(a.public_dir(), a.clone().public_dir(), "deterministic");
        assert_ne!(a.public_dir(), b.public_dir());
        let p = a.public_dir().display().to_string();
        assert!(
            p.starts_with("/run/boma-qvm-dnsmasq-") && p.len() == 22 + 16,
            "{p}"
        );
        // Without a record of it, the files stay in the state's own directory.
        assert_eq!(b.reread_dir(), b.dir);
        assert_eq!(b.dhcp_hosts(), b.dir.join("dhcp-hosts"));
    }
}
