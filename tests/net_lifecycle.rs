//! Lifecycle and failure modes of the VM network, each in its own network namespace:
//! prune after a crash, taps tied to their fd, refused subnets and bridges, a dead dnsmasq,
//! doctor against a foreign default-deny table, and running unchanged under `ip netns exec`.

mod common;

use std::time::Duration;

use boma_qvm::Error;
use boma_qvm::net::files::NetFiles;
use boma_qvm::net::rtnl::Rtnl;
use boma_qvm::net::{self, DnsmasqState, NetConfig, Network, open_tap, tap_name_for};
use boma_qvm::paths::Dirs;
use common::netns::Netns;
use common::world::{OUTSIDE, UPLINK, World};

const UNRELATED: &str = "table inet keepme {\n\tchain c {\n\t\ttype filter hook output priority 10; policy accept;\n\t}\n}";

struct Lite {
    ns: Netns,
    _tmp: tempfile::TempDir,
    dirs: Dirs,
    cfg: NetConfig,
}

fn lite(tag: &str) -> Lite {
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

fn proc_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
}

#[test]
fn prune_after_a_crash_removes_every_network_object() {
    let l = lite("p");
    let before = l.ns.exec_ok("nft list ruleset");
    let tap = tap_name_for("boma-it-crash");
    let (pid, fd) = l.ns.block_on(|| async {
        let network = Network::up(&l.dirs, &l.cfg).await.unwrap();
        let vm = network
            .vm_net("boma-it-crash", vec!["crash.example.org".into()], false)
            .unwrap();
        network.register_vm(&vm).unwrap();
        let fd = open_tap(&tap, &l.cfg.bridge).await.unwrap();
        let DnsmasqState::Running(pid) = network.status().await.unwrap().dnsmasq else {
            panic!("no dnsmasq")
        };
        (pid, fd) // "crash": the Network handle is simply forgotten, a QEMU still holds the tap
    });
    assert!(proc_alive(pid));

    let report = l.ns.block_on(|| net::prune(&l.dirs)).unwrap();
    let text = report.to_string();
    for item in [
        format!("dnsmasq (pid {pid})"),
        "nft table inet boma_qvm".into(),
        format!("tap {tap}"),
        "bridge boma-qvm0".into(),
    ] {
        assert!(text.contains(&item), "prune did not report {item}:\n{text}");
    }
    assert!(!proc_alive(pid), "dnsmasq {pid} survived prune");
    let links =
        l.ns.block_on(|| async { Rtnl::connect().unwrap().links().await.unwrap() });
    assert!(
        links.iter().all(|k| k.name != tap && k.name != "boma-qvm0"),
        "{links:?}"
    );
    assert_eq!(
        l.ns.exec_ok("nft list ruleset"),
        before,
        "other tables changed"
    );
    drop(fd);

    // Nothing left: a second prune finds nothing.
    assert!(
        l.ns.block_on(|| net::prune(&l.dirs))
            .unwrap()
            .removed
            .is_empty()
    );

    // prune kills by pid file only if the pid really is our dnsmasq.
    let mut ns = l.ns;
    let sleeper = ns.spawn("sleep 300");
    let mut waited = 0;
    while std::fs::read(format!("/proc/{sleeper}/cmdline"))
        .unwrap_or_default()
        .starts_with(b"ip")
        && waited < 100
    {
        std::thread::sleep(Duration::from_millis(20)); // until `ip netns exec` has exec'd sleep
        waited += 1;
    }
    let files = NetFiles::new(&l.dirs);
    std::fs::create_dir_all(&files.dir).unwrap();
    std::fs::write(files.pid(), sleeper.to_string()).unwrap();
    let report = ns.block_on(|| net::prune(&l.dirs)).unwrap();
    assert!(report.removed.is_empty(), "{report}");
    assert!(
        proc_alive(sleeper),
        "prune killed a process that is not our dnsmasq"
    );
}

#[test]
fn tap_is_on_the_bridge_and_vanishes_when_its_fd_closes() {
    let l = lite("t");
    let tap = tap_name_for("boma-it-tap");
    l.ns.block_on(|| async {
        let network = Network::up(&l.dirs, &l.cfg).await.unwrap();
        let rtnl = Rtnl::connect().unwrap();
        let bridge = rtnl.link("boma-qvm0").await.unwrap().unwrap();
        let fd = open_tap(&tap, "boma-qvm0").await.unwrap();
        let link = rtnl
            .link(&tap)
            .await
            .unwrap()
            .expect("tap exists while its fd is open");
        assert_eq!(
            link.controller,
            Some(bridge.index),
            "tap is a port of the bridge"
        );
        assert!(link.up);
        drop(fd);
        let mut gone = false;
        for _ in 0..100 {
            if rtnl.link(&tap).await.unwrap().is_none() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "tap {tap} still exists after its fd was closed");

        let e = open_tap(&tap, "no-such-br").await.unwrap_err();
        assert!(
            matches!(e, Error::Network { .. })
                && e.to_string().contains("bridge no-such-br does not exist"),
            "{e}"
        );
        assert!(
            rtnl.link(&tap).await.unwrap().is_none(),
            "failed open_tap left a tap behind"
        );
        network.down().await.unwrap();
    });
}

#[test]
fn subnet_overlapping_a_host_route_is_refused_and_nothing_is_built() {
    let l = lite("r");
    l.ns.ip("link add up0 type veth peer name up0p");
    l.ns.ip("addr add 192.168.0.5/16 dev up0");
    l.ns.ip("link set up0 up");
    l.ns.ip("link set up0p up");
    let before = l.ns.exec_ok("nft list ruleset");
    let e = l.ns.block_on(|| Network::up(&l.dirs, &l.cfg)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Network { .. }), "{msg}");
    assert!(
        msg.contains("subnet 192.168.231.0/24 overlaps the route 192.168.0.0/16 dev up0"),
        "{msg}"
    );
    assert!(msg.contains("fix:") && msg.contains("--subnet"), "{msg}");
    assert!(
        l.ns.exec("ip link show boma-qvm0").status.code() != Some(0),
        "bridge was created"
    );
    assert_eq!(l.ns.exec_ok("nft list ruleset"), before);
    assert!(
        !NetFiles::new(&l.dirs).pid().exists(),
        "dnsmasq was started"
    );

    // A free subnet works on the same host.
    let cfg = NetConfig {
        subnet: "172.20.1.0/24".parse().unwrap(),
        ..l.cfg.clone()
    };
    l.ns.block_on(|| async {
        let n = Network::up(&l.dirs, &cfg).await.unwrap();
        assert!(n.status().await.unwrap().healthy());
        n.down().await.unwrap();
    });
}

#[test]
fn existing_bridge_with_another_address_is_refused_and_left_alone() {
    let l = lite("b");
    l.ns.ip("link add boma-qvm0 type bridge");
    l.ns.ip("addr add 192.168.99.1/24 dev boma-qvm0");
    let e = l.ns.block_on(|| Network::up(&l.dirs, &l.cfg)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(
            "bridge boma-qvm0 already exists with address 192.168.99.1/24, not 192.168.231.1/24"
        ),
        "{msg}"
    );
    assert!(msg.contains("fix:"), "{msg}");
    assert!(
        l.ns.ip("-4 addr show dev boma-qvm0")
            .contains("192.168.99.1/24"),
        "foreign bridge was changed"
    );
    assert!(!l.ns.exec_ok("nft list tables").contains("boma_qvm"));
}

#[test]
fn dead_dnsmasq_is_reported_and_up_restarts_it() {
    let l = lite("d");
    l.ns.block_on(|| async {
        let network = Network::up(&l.dirs, &l.cfg).await.unwrap();
        let DnsmasqState::Running(pid) = network.status().await.unwrap().dnsmasq else {
            panic!("not running")
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let mut status = network.status().await.unwrap();
        for _ in 0..100 {
            if status.dnsmasq != DnsmasqState::Running(pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            status = network.status().await.unwrap();
        }
        assert_eq!(status.dnsmasq, DnsmasqState::Died, "{status}");
        assert!(!status.healthy());
        assert!(status.to_string().contains("DIED"), "{status}");

        let network = Network::up(&l.dirs, &l.cfg).await.unwrap();
        let status = network.status().await.unwrap();
        assert!(status.healthy(), "{status}");
        assert!(
            matches!(status.dnsmasq, DnsmasqState::Running(p) if p != pid),
            "{status}"
        );
        network.down().await.unwrap();
    });
}

/// The bug class boma-qvm exists to catch, on its own network: a foreign default-deny table eats
/// the VMs' DHCP (input) and forwarded traffic; doctor names both and its fix repairs them.
#[test]
fn doctor_flags_foreign_policy_drop_and_its_fix_works() {
    let mut w = World::new();
    w.host.exec_ok(
        "nft -f - <<'EOF'
table inet filter {
	chain input { type filter hook input priority 0; policy drop; ct state established,related accept; iifname \"lo\" accept; }
	chain forward { type filter hook forward priority 0; policy drop; }
}
EOF",
    );
    let network = w.host.block_on(|| Network::up(&w.dirs, &w.cfg)).unwrap();
    let vm_net = w
        .host
        .run(|| network.vm_net("boma-it-doc", vec![], true))
        .unwrap();
    w.host.run(|| network.register_vm(&vm_net)).unwrap();
    let vm = w.add_vm("boma-it-doc");

    let warnings = w.host.run(|| net::doctor(&w.cfg)).unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    let all: String = warnings.iter().map(|x| x.to_string() + "\n").collect();
    assert!(
        all.contains("table inet filter, chain forward (hook forward, policy drop)"),
        "{all}"
    );
    assert!(
        all.contains("table inet filter, chain input (hook input, policy drop)"),
        "{all}"
    );
    assert!(vm.dhcp().is_err(), "the foreign input drop should eat DHCP");

    // Apply exactly the commands doctor printed.
    for cmd in all
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("nft insert rule"))
    {
        w.host.exec_ok(cmd);
    }
    assert_eq!(w.host.run(|| net::doctor(&w.cfg)).unwrap(), vec![]);
    assert_eq!(vm.dhcp().unwrap(), vm_net.ip);
    let cgi = format!("http://{OUTSIDE}/cgi-bin/addr");
    assert_eq!(
        vm.get(&cgi).unwrap().trim(),
        UPLINK,
        "egress through the fixed forward chain"
    );
    assert!(
        vm.get("http://10.20.0.1:8081/").is_err(),
        "our table still isolates the VM"
    );
    w.host.block_on(|| network.down()).unwrap();
}

/// boma-qvm's code runs unchanged in a process started by `ip netns exec` (how a user confines
/// it): this test re-executes itself that way and does the work in the child.
#[test]
fn runs_unchanged_under_ip_netns_exec() {
    const MARK: &str = "BOMA_QVM_NET_INNER";
    if std::env::var_os(MARK).is_some() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dirs = Dirs::from_env();
            let cfg = NetConfig {
                upstream_dns: Some(vec![]),
                ..NetConfig::default()
            };
            let network = Network::up(&dirs, &cfg).await.unwrap();
            assert!(network.status().await.unwrap().healthy());
            let vm = network
                .vm_net("boma-it-inner", vec!["inner.example.org".into()], true)
                .unwrap();
            network.register_vm(&vm).unwrap();
            let fd = open_tap(&tap_name_for("boma-it-inner"), &cfg.bridge)
                .await
                .unwrap();
            drop(fd);
            network.down().await.unwrap();
        });
        println!("INNER-DONE");
        return;
    }
    let l = lite("x");
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &l.ns.name])
        .arg(&exe)
        .args([
            "--exact",
            "runs_unchanged_under_ip_netns_exec",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MARK, "1")
        .env("BOMA_QVM_STATE_DIR", &l.dirs.state)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("INNER-DONE"),
        "the inner run did not happen:\n{stdout}"
    );
    assert!(
        NetFiles::new(&l.dirs).leases().parent().unwrap().exists(),
        "state went elsewhere"
    );
    assert!(l.ns.exec("ip link show boma-qvm0").status.code() != Some(0));
}
