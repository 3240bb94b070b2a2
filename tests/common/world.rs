//! A test world in namespaces, built with `ip` (only boma-qvm's own code uses rtnetlink):
//!
//! - `host`: where boma-qvm runs. Has a "LAN" interface (10.20.0.1/16 on a veth, with a web server on
//!   10.20.0.1:8081 and one on *:8082), an unrelated nft table that must survive untouched,
//!   and an uplink veth 198.51.100.1/24 to `outside`, with routes to a "LAN" host 172.16.9.2 and
//!   a "mesh" host 100.64.1.2 behind it.
//! - `outside`: the "internet": 198.51.100.2 (plus 172.16.9.2 and 100.64.1.2 on lo), a busybox
//!   httpd whose CGI echoes the client address, and a real dnsmasq as upstream DNS answering
//!   `outside.test`.
//! - `Vm`s: one namespace each, a veth whose host end is enslaved to the bridge, MAC = mac_for
//!   (name), busybox udhcpc as the DHCP client and a fake SSH banner on port 22.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;

use boma_qvm::net::{Mac, NetConfig, mac_for};
use boma_qvm::paths::Dirs;

use super::netns::{Netns, sh_ok};

pub const UNRELATED_TABLE: &str = "table ip unrelated {
	set blocked {
		type ipv4_addr
		elements = { 203.0.113.9 }
	}

	chain pre {
		type filter hook prerouting priority -5; policy accept;
		ip saddr 203.0.113.7 drop
	}
}";

pub const OUTSIDE: &str = "198.51.100.2";
pub const UPLINK: &str = "198.51.100.1";

pub struct World {
    pub host: Netns,
    pub outside: Netns,
    pub tmp: tempfile::TempDir,
    pub dirs: Dirs,
    pub cfg: NetConfig,
    vms: usize,
    _dnsmasq_dir: super::DnsmasqDir,
}

const CGI: &str = "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"$REMOTE_ADDR\"\n";

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    ;;
esac
exit 0
"#;

fn write_exec(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

impl World {
    pub fn new() -> World {
        super::qemu_account();
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("boma_qvm=debug")
            .try_init();
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let www = root.join("www");
        write_exec(&www.join("cgi-bin/addr"), CGI);
        std::fs::write(www.join("index.html"), "hello\n").unwrap();
        write_exec(&root.join("udhcpc.sh"), UDHCPC_SCRIPT);

        let mut host = Netns::new("h");
        let mut outside = Netns::new("o");
        // This kernel has no `dummy` driver: a veth pair kept inside the host namespace serves.
        host.ip("link add lan0 type veth peer name lan0p");
        host.ip("link set lan0p up");
        host.ip("addr add 10.20.0.1/16 dev lan0");
        host.ip("link set lan0 up");
        host.ip(&format!(
            "link add up0 type veth peer name eth0 netns {}",
            outside.name
        ));
        host.ip(&format!("addr add {UPLINK}/24 dev up0"));
        host.ip("link set up0 up");
        outside.ip(&format!("addr add {OUTSIDE}/24 dev eth0"));
        outside.ip("link set eth0 up");
        outside.ip("addr add 172.16.9.2/32 dev lo");
        outside.ip("addr add 100.64.1.2/32 dev lo");
        host.ip(&format!("route add 172.16.9.0/24 via {OUTSIDE}"));
        host.ip(&format!("route add 100.64.1.0/24 via {OUTSIDE}"));
        // The outside can route back to the VMs' subnet, so when the VMs cannot reach something
        // beyond the host it is boma-qvm's rules doing it, not a missing return route.
        outside.ip(&format!("route add 192.168.231.0/24 via {UPLINK}"));
        host.exec_ok(&format!("nft -f - <<'EOF'\n{UNRELATED_TABLE}\nEOF"));

        let www = www.display();
        outside.spawn(&format!("busybox httpd -f -p 0.0.0.0:80 -h {www}"));
        outside.spawn(&format!(
            "dnsmasq -k --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces --user=root \
             --listen-address={OUTSIDE} --address=/outside.test/{OUTSIDE} --pid-file={}/up-dns.pid",
            root.display()
        ));
        host.spawn(&format!("busybox httpd -f -p 10.20.0.1:8081 -h {www}"));
        host.spawn(&format!("busybox httpd -f -p 0.0.0.0:8082 -h {www}"));

        let dirs = Dirs::under(&root.join("bq"));
        let cfg = NetConfig {
            upstream_dns: Some(vec![OUTSIDE.parse().unwrap()]),
            ..NetConfig::default()
        };
        let w = World {
            host,
            outside,
            _dnsmasq_dir: super::DnsmasqDir::of(&dirs),
            dirs,
            cfg,
            tmp,
            vms: 0,
        };
        // Fixtures are up before any test relies on them (positive controls).
        w.wait_until("host reaches the LAN web server", || {
            w.host_get("http://10.20.0.1:8081/").is_ok()
        });
        w.wait_until("host reaches the outside web server", || {
            w.host_get("http://172.16.9.2/").is_ok()
        });
        w
    }

    pub fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..100 {
            if f() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("gave up waiting until {what}");
    }

    /// `nft list ruleset` in the host namespace.
    pub fn ruleset(&self) -> String {
        self.host.exec_ok("nft list ruleset")
    }

    /// HTTP GET from the host namespace (`timeout`, since busybox 1.35 wget -T segfaults here).
    pub fn host_get(&self, url: &str) -> Result<String, String> {
        out(self
            .host
            .exec(&format!("timeout 3 busybox wget -q -O- {url}")))
    }

    pub fn udhcpc_script(&self) -> PathBuf {
        self.tmp.path().join("udhcpc.sh")
    }

    /// A "VM": its own namespace, a veth into the bridge (which must exist), MAC = mac_for(name),
    /// a fake sshd banner on port 22.
    pub fn add_vm(&mut self, name: &str) -> Vm {
        let mut ns = Netns::new("v");
        let port = format!("vmp{}", self.vms);
        self.vms += 1;
        let mac = mac_for(name);
        self.host.ip(&format!(
            "link add {port} type veth peer name eth0 netns {}",
            ns.name
        ));
        self.host
            .ip(&format!("link set {port} master {} up", self.cfg.bridge));
        ns.ip(&format!("link set eth0 address {mac}"));
        ns.ip("link set eth0 up");
        ns.spawn("busybox nc -ll -p 22 -e /bin/echo SSH-2.0-fake-vm");
        Vm {
            ns,
            name: name.to_string(),
            mac,
            script: self.udhcpc_script(),
        }
    }
}

pub struct Vm {
    pub ns: Netns,
    pub name: String,
    pub mac: Mac,
    script: PathBuf,
}

fn out(o: std::process::Output) -> Result<String, String> {
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    if o.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{} {text}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

impl Vm {
    /// Run the real DHCP client once; returns the IPv4 address it configured.
    pub fn dhcp(&self) -> Result<Ipv4Addr, String> {
        out(self.ns.exec(&format!(
            "busybox udhcpc -i eth0 -f -q -n -t 5 -T 2 -s {}",
            self.script.display()
        )))?;
        let addrs = sh_ok(&format!("ip -n {} -4 -o addr show dev eth0", self.ns.name));
        let ip = addrs
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .ok_or(format!("no address: {addrs}"))?;
        ip.split('/')
            .next()
            .unwrap()
            .parse()
            .map_err(|e| format!("{ip}: {e}"))
    }

    /// HTTP GET from inside the VM (short timeout: used for "must fail" checks too).
    pub fn get(&self, url: &str) -> Result<String, String> {
        out(self
            .ns
            .exec(&format!("timeout 2 busybox wget -q -O- {url}")))
    }

    /// DNS lookup against `server` from inside the VM; the addresses in the answer.
    pub fn lookup(&self, name: &str, server: Ipv4Addr) -> Vec<Ipv4Addr> {
        let o = self
            .ns
            .exec(&format!("busybox nslookup -type=a {name} {server}"));
        let text = String::from_utf8_lossy(&o.stdout);
        // The first "Address:" is the server itself; answers follow "Name:".
        text.split("Name:")
            .skip(1)
            .flat_map(|blk| {
                blk.lines()
                    .filter_map(|l| l.trim().strip_prefix("Address:"))
                    .map(str::trim)
            })
            .filter_map(|a| a.parse().ok())
            .collect()
    }
}
