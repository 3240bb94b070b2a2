//! What the network refuses or warns about: a subnet colliding with a host route, a bridge of
//! our name with another address, and (doctor) a foreign default-deny table.

mod common;

use boma_qvm::Error;
use boma_qvm::net::files::NetFiles;
use boma_qvm::net::{self, NetConfig, Network};
use common::lite::lite;
use common::world::{OUTSIDE, UPLINK, World};

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
    eprintln!("user sees: {msg}");
    assert!(matches!(e, Error::Network { .. }), "{msg}");
    assert!(
        msg.contains("subnet 192.168.231.0/24 overlaps the route 192.168.0.0/16 dev up0"),
        "{msg}"
    );
    assert!(
        msg.contains("fix:") && msg.contains("--subnet 172.16.231.0/24, which is free here"),
        "{msg}"
    );
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

/// A bridge of our default name that this state did not make (an older boma-qvm's, or
/// someone's) is not adopted, whatever its address.
#[test]
fn existing_bridge_of_our_name_is_refused_and_left_alone() {
    let l = lite("b");
    l.ns.ip("link add boma-qvm0 type bridge");
    l.ns.ip("addr add 192.168.99.1/24 dev boma-qvm0");
    let e = l.ns.block_on(|| Network::up(&l.dirs, &l.cfg)).unwrap_err();
    let msg = e.to_string();
    eprintln!("user sees: {msg}");
    assert!(
        msg.contains("bridge boma-qvm0 exists and boma-qvm did not create it")
            && msg.contains("ip link del boma-qvm0"),
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

/// Something else holds DNS on the bridge address: dnsmasq cannot start, and `up` says why.
#[test]
fn dnsmasq_that_cannot_bind_is_a_clear_error() {
    let mut l = lite("s");
    // Our own bridge from an earlier `up` (reused); its dnsmasq died and a squatter took
    // 192.168.231.1:53.
    l.ns.block_on(|| Network::up(&l.dirs, &l.cfg)).unwrap();
    let files = NetFiles::new(&l.dirs);
    let pid: i32 = std::fs::read_to_string(files.pid())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    while common::lite::proc_alive(pid as u32) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    l.ns.spawn(
        "python3 -c \"import socket,time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.bind(('192.168.231.1', 53)); time.sleep(300)\"",
    );
    let mut bound = false;
    for _ in 0..100 {
        if l.ns.exec_ok("ss -uln").contains("192.168.231.1:53") {
            bound = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(bound, "squatter did not bind");
    let e = l.ns.block_on(|| Network::up(&l.dirs, &l.cfg)).unwrap_err();
    let msg = e.to_string();
    eprintln!("user sees: {msg}");
    assert!(matches!(e, Error::Network { .. }), "{msg}");
    assert!(
        msg.contains("dnsmasq did not start") && msg.contains("Address already in use"),
        "{msg}"
    );
    assert!(
        msg.contains("fix: another DNS/DHCP server holds port 53 or 67"),
        "{msg}"
    );
    assert!(!files.pid().exists());
    // prune still cleans up the half-built network.
    let report = l.ns.block_on(|| net::prune(&l.dirs)).unwrap();
    assert!(report.to_string().contains("bridge boma-qvm0"), "{report}");
}
