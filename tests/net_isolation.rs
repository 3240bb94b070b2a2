//! The whole VM network, end to end, in network namespaces: real dnsmasq, real nftables, a real
//! DHCP client (busybox udhcpc), real traffic. See tests/common/world.rs for the world.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use boma_qvm::net::files::NetFiles;
use boma_qvm::net::{self, DnsmasqState, Network};
use common::lite::proc_alive;
use common::world::{OUTSIDE, UPLINK, World};
use common::{Env, Run};

#[test]
fn vm_gets_its_lease_is_reachable_and_is_isolated() {
    // Every call into boma-qvm's network code goes through `w.host.run`/`block_on` (inside the
    // host namespace); the test thread itself stays in the test process's namespace.
    let mut w = World::new();
    let before = w.ruleset();
    let unrelated = w.host.exec_ok("nft list table ip unrelated");
    assert!(before.contains("table ip unrelated"), "{before}");
    // The namespace's own forwarding switch (/proc/sys/net is per network namespace).
    const FORWARD: &str = "cat /proc/sys/net/ipv4/ip_forward";
    let init_forward = w.host.exec_ok(FORWARD);

    let network = w.host.block_on(|| Network::up(&w.dirs, &w.cfg)).unwrap();
    assert_eq!(
        w.host.exec_ok("cat /proc/sys/net/ipv4/ip_forward").trim(),
        "1",
        "up enables forwarding"
    );
    let status = w.host.block_on(|| network.status()).unwrap();
    assert!(status.healthy(), "{status}");

    // Register the VM before it boots: static lease + local DNS answer.
    let vm_net = w
        .host
        .run(|| network.vm_net("boma-it-askari", vec!["askari.wingu.me".into()], true))
        .unwrap();
    w.host.run(|| network.register_vm(&vm_net)).unwrap();
    let vm = w.add_vm("boma-it-askari");
    assert_eq!(vm.mac, vm_net.mac);

    // The real DHCP client gets the pinned address; the tool finds it in the lease file.
    let got = vm.dhcp().unwrap();
    assert_eq!(got, vm_net.ip);
    let lease_file = network.lease_file();
    let found = w
        .host
        .block_on(|| net::wait_for_lease(&lease_file, &vm_net.mac, Duration::from_secs(10)))
        .unwrap();
    assert_eq!(found, vm_net.ip);

    // The host reaches the VM: ping and the (fake) SSH banner.
    w.host
        .exec_ok(&format!("busybox ping -c1 -W3 {}", vm_net.ip));
    let banner = w
        .host
        .block_on(|| net::wait_for_ssh(vm_net.ip, Duration::from_secs(20)))
        .unwrap();
    assert_eq!(banner, "SSH-2.0-fake-vm");

    // Nothing private is reachable from the VM, though each target is alive for the host:
    // a LAN address local to the host (INPUT), a routed LAN and a routed mesh host (FORWARD),
    // and a non-DHCP/DNS service on the host's bridge address.
    let private = [
        ("http://10.20.0.1:8081/", "http://10.20.0.1:8081/"),
        ("http://172.16.9.2/", "http://172.16.9.2/"),
        ("http://100.64.1.2/", "http://100.64.1.2/"),
        ("http://192.168.231.1:8082/", "http://127.0.0.1:8082/"),
    ];
    for (url, host_url) in private {
        assert!(
            w.host_get(host_url).is_ok(),
            "control: host cannot reach {host_url}"
        );
        let r = vm.get(url);
        assert!(r.is_err(), "VM reached {url}: {r:?}");
    }
    // ... and it is our table doing it: without it the VM reaches every one of them.
    w.host.exec_ok("nft delete table inet boma_qvm");
    for (url, _) in private {
        assert!(
            vm.get(url).is_ok(),
            "without boma-qvm's table the VM should reach {url}"
        );
    }
    // `up` again repairs it (idempotent; dnsmasq kept, only reloaded).
    let pid = w.host.block_on(|| network.status()).unwrap().dnsmasq;
    w.host.block_on(|| Network::up(&w.dirs, &w.cfg)).unwrap();
    assert_eq!(w.host.block_on(|| network.status()).unwrap().dnsmasq, pid);
    for (url, _) in private {
        assert!(vm.get(url).is_err(), "after re-up the VM reached {url}");
    }

    // Egress: masqueraded out, switched off and on again on the running VM.
    let cgi = format!("http://{OUTSIDE}/cgi-bin/addr");
    assert_eq!(
        vm.get(&cgi).unwrap().trim(),
        UPLINK,
        "outside sees the masqueraded source"
    );
    w.host.run(|| network.set_egress(vm_net.ip, false)).unwrap();
    assert!(vm.get(&cgi).is_err(), "egress off must block the VM");
    w.host.run(|| network.set_egress(vm_net.ip, true)).unwrap();
    assert_eq!(vm.get(&cgi).unwrap().trim(), UPLINK, "egress on again");

    // DNS: the mirrored host's public name resolves to the VM; upstream only with egress on.
    let gw = w.cfg.gateway();
    assert_eq!(vm.lookup("askari.wingu.me", gw), vec![vm_net.ip]);
    let outside_ip: Ipv4Addr = OUTSIDE.parse().unwrap();
    assert_eq!(
        vm.lookup("outside.test", gw),
        vec![outside_ip],
        "upstream DNS with egress on"
    );
    w.host.run(|| network.set_egress(vm_net.ip, false)).unwrap();
    assert_eq!(
        vm.lookup("outside.test", gw),
        Vec::<Ipv4Addr>::new(),
        "no upstream DNS with egress off"
    );
    assert_eq!(
        vm.lookup("askari.wingu.me", gw),
        vec![vm_net.ip],
        "local answers stay"
    );
    w.host.run(|| network.set_egress(vm_net.ip, true)).unwrap();

    // The unrelated table was never touched while we were up.
    assert_eq!(w.host.exec_ok("nft list table ip unrelated"), unrelated);

    // Unregister: static lease, lease-file entry and DNS answer are gone.
    assert!(
        w.host
            .run(|| network.unregister_vm("boma-it-askari"))
            .unwrap()
    );
    let leases = std::fs::read_to_string(network.lease_file()).unwrap_or_default();
    assert!(
        !leases.contains(&vm_net.mac.to_string()),
        "lease left: {leases}"
    );
    assert_eq!(vm.lookup("askari.wingu.me", gw), Vec::<Ipv4Addr>::new());

    // Down: nothing of ours left, every other table byte-for-byte as before.
    w.host.block_on(|| network.clone().down()).unwrap();
    let status = w.host.block_on(|| network.status()).unwrap();
    assert!(status.is_down(), "{status}");
    assert_eq!(status.dnsmasq, DnsmasqState::Stopped);
    assert_eq!(w.ruleset(), before);
    assert!(w.host.exec("ip link show boma-qvm0").status.code() != Some(0));
    assert_eq!(
        w.host.exec_ok(FORWARD),
        init_forward,
        "forwarding is back to what it was before the network came up"
    );
}

/// Root runs boma-qvm directly with a private state directory (its parent 0700, like root's own
/// /root/...): dnsmasq still drops to nobody. The files it re-reads as nobody live in a directory
/// of their own under /run, so a VM registered after it started (by another process, through the
/// record) gets its static lease and its DNS name; `net down` leaves neither that directory nor
/// dnsmasq. A second `up` that adds upstream DNS is seen through the third re-read file.
#[test]
fn root_with_a_private_state_dir_still_runs_dnsmasq_as_nobody() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut w = World::new();
    let env = Env::new();
    let private = env.tmp.path();
    std::fs::set_permissions(private, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(env.dirs.state.starts_with(private));
    let files = NetFiles::new(&env.dirs);
    let public = files.public_dir();

    env.cli_in(&w.host).ok(&["net", "up"]);
    assert!(!boma_qvm::net::dnsmasq::enterable_by_others(&files.dir));
    let pid = common::assert_dnsmasq_runs_as_nobody(&files.pid());
    let m = std::fs::symlink_metadata(&public).unwrap();
    assert!(
        m.is_dir() && m.uid() == 0 && m.mode() & 0o777 == 0o755,
        "{m:?}"
    );
    let conf = std::fs::read_to_string(files.dnsmasq_conf()).unwrap();
    assert!(
        conf.contains(&format!("dhcp-hostsfile={}/dhcp-hosts", public.display())),
        "{conf}"
    );

    // Registered after dnsmasq started: it re-reads dhcp-hosts and hosts on SIGHUP, as nobody.
    let network = Network::saved(&env.dirs);
    let vm_net = w
        .host
        .run(|| {
            let v = network.vm_net("boma-it-private", vec!["private.example.org".into()], true)?;
            network.register_vm(&v).map(|()| v)
        })
        .unwrap();
    let dhcp_hosts = public.join("dhcp-hosts");
    assert!(
        std::fs::read_to_string(&dhcp_hosts)
            .unwrap()
            .contains(&vm_net.mac.to_string())
    );
    assert_eq!(
        std::fs::metadata(&dhcp_hosts).unwrap().mode() & 0o777,
        0o644
    );
    let vm = w.add_vm("boma-it-private");
    assert_eq!(vm.dhcp().unwrap(), vm_net.ip, "the static lease");
    assert_eq!(
        vm.lookup("private.example.org", w.cfg.gateway()),
        vec![vm_net.ip],
        "the DNS name added after dnsmasq started"
    );
    // A second `up` with upstream DNS only rewrites the servers file: the same dnsmasq re-reads
    // it, as nobody, and forwards.
    w.host.block_on(|| Network::up(&env.dirs, &w.cfg)).unwrap();
    assert_eq!(
        std::fs::read_to_string(files.pid()).unwrap().trim(),
        pid.to_string(),
        "reloaded, not restarted"
    );
    assert_eq!(
        vm.lookup("outside.test", w.cfg.gateway()),
        vec![OUTSIDE.parse::<Ipv4Addr>().unwrap()],
        "upstream DNS from the re-read servers file"
    );
    let log = std::fs::read_to_string(files.log()).unwrap();
    assert!(!log.contains("Permission denied"), "{log}");

    env.cli_in(&w.host).ok(&["net", "down"]);
    assert!(!proc_alive(pid as u32), "dnsmasq {pid} survived net down");
    assert!(
        std::fs::symlink_metadata(&public).is_err(),
        "{} left behind",
        public.display()
    );
    let left = w.host.leftovers(&env.dirs.state);
    assert!(left.is_empty(), "left behind:\n{left}");
}
