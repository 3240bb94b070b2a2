//! A bare namespace with an unrelated nft table and a private state dir.

#![allow(dead_code)]

use boma_qvm::net::NetConfig;
use boma_qvm::paths::Dirs;

use super::netns::Netns;

pub const UNRELATED: &str = "table inet keepme {\n\tchain c {\n\t\ttype filter hook output priority 10; policy accept;\n\t}\n}";

pub struct Lite {
    pub ns: Netns,
    pub _tmp: tempfile::TempDir,
    pub dirs: Dirs,
    pub cfg: NetConfig,
    pub _dnsmasq_dir: super::DnsmasqDir,
}

pub fn lite(tag: &str) -> Lite {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("boma_qvm=debug")
        .try_init();
    let ns = Netns::new(tag);
    ns.exec_ok(&format!("nft -f - <<'EOF'\n{UNRELATED}\nEOF"));
    let tmp = tempfile::tempdir().unwrap();
    let dirs = Dirs::under(tmp.path());
    Lite {
        ns,
        _tmp: tmp,
        _dnsmasq_dir: super::DnsmasqDir::of(&dirs),
        dirs,
        cfg: NetConfig {
            upstream_dns: Some(vec![]),
            ..NetConfig::default()
        },
    }
}

impl Lite {
    /// The state dir made private (its parent 0700), as root's own /root/... is; a temporary
    /// directory is 0755.
    pub fn private(self) -> Lite {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self._tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        self
    }
}

pub fn proc_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
}
