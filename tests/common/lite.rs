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
        dirs,
        cfg: NetConfig {
            upstream_dns: Some(vec![]),
            ..NetConfig::default()
        },
    }
}

pub fn proc_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
}
