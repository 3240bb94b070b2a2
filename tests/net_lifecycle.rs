//! Lifecycle of the VM network, each test in its own network namespace: prune after a crash,
//! a dead dnsmasq, a re-up that keeps VM state, and running unchanged under `ip netns exec`.

mod common;

use std::time::Duration;

use boma_qvm::net::confine::{self, Held};
use boma_qvm::net::files::NetFiles;
use boma_qvm::net::owned::{LinkRecord, Owned};
use boma_qvm::net::rtnl::Rtnl;
use boma_qvm::net::{self, DnsmasqState, NetConfig, Network, nft, tap_name_for};
use boma_qvm::paths::Dirs;
use common::lite::{lite, proc_alive};

#[test]
fn prune_after_a_crash_removes_every_network_object() {
    let l = lite("p").private();
    let before = l.ns.exec_ok("nft list ruleset");
    let tap = tap_name_for("boma-it-crash");
    let (pid, fd) = l.ns.block_on(|| async {
        let network = Network::up(&l.dirs, &l.cfg).await.unwrap();
        let vm = network
            .vm_net("boma-it-crash", vec!["crash.example.org".into()], false)
            .unwrap();
        network.register_vm(&vm).unwrap();
        let fd = network.open_tap("boma-it-crash").await.unwrap();
        let DnsmasqState::Running(pid) = network.status().await.unwrap().dnsmasq else {
            panic!("no dnsmasq")
        };
        (pid, fd) // "crash": the Network handle is simply forgotten, a QEMU still holds the tap
    });
    assert!(proc_alive(pid));
    // The state dir is private: dnsmasq's re-read files are in a directory of their own under
    // /run, which prune removes too.
    let public = NetFiles::new(&l.dirs).public_dir();
    assert!(public.join("dhcp-hosts").exists());

    let report = l.ns.block_on(|| net::prune(&l.dirs)).unwrap();
    let text = report.to_string();
    for item in [
        format!("dnsmasq (pid {pid})"),
        "nft table inet boma_qvm".into(),
        format!("tap {tap}"),
        "bridge boma-qvm0".into(),
        format!("directory {}", public.display()),
    ] {
        assert!(text.contains(&item), "prune did not report {item}:\n{text}");
    }
    assert!(!proc_alive(pid), "dnsmasq {pid} survived prune");
    assert!(
        std::fs::symlink_metadata(&public).is_err(),
        "{public:?} left"
    );
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

/// A second `up` (a new process, a reboot of the host side) keeps what VMs registered: a VM with
/// egress off stays off, its static lease and DNS answer stay.
#[test]
fn up_again_keeps_vm_egress_and_records() {
    let l = lite("u");
    l.ns.block_on(|| async {
        let network = Network::up(&l.dirs, &l.cfg).await.unwrap();
        let vm = network
            .vm_net("boma-it-noegress", vec!["a.example.org".into()], false)
            .unwrap();
        network.register_vm(&vm).unwrap();
        let other = network.vm_net("boma-it-other", vec![], true).unwrap();
        assert_ne!(other.ip, vm.ip, "a second VM gets another address");
        assert_eq!(nft::no_egress_members().unwrap(), vec![vm.ip]);

        let again = Network::up(&l.dirs, &l.cfg).await.unwrap();
        assert_eq!(
            nft::no_egress_members().unwrap(),
            vec![vm.ip],
            "re-up re-enabled egress"
        );
        assert_eq!(again.vms().unwrap(), vec![vm.clone()]);
        let files = NetFiles::new(&l.dirs);
        let dhcp = std::fs::read_to_string(files.dhcp_hosts()).unwrap();
        assert!(
            dhcp.contains(&format!("{},{},boma-it-noegress", vm.mac, vm.ip)),
            "{dhcp}"
        );
        assert!(
            std::fs::read_to_string(files.hosts())
                .unwrap()
                .contains(&format!("{} a.example.org", vm.ip))
        );
        // Same name, same identity.
        assert_eq!(
            again.vm_net("boma-it-noegress", vec![], true).unwrap().ip,
            vm.ip
        );

        again.set_egress(vm.ip, true).unwrap();
        assert!(nft::no_egress_members().unwrap().is_empty());
        again.down().await.unwrap();
    });
}

/// A confinement veth goes away by itself when the confined process's namespace dies, on the
/// kernel's schedule: it may be gone before `release`, or vanish between its lookup and its
/// delete. Either way the release succeeds and the record forgets it (CI once kept a record).
#[test]
fn a_confinement_veth_the_kernel_already_took_is_released_and_forgotten() {
    let l = lite("v");
    l.ns.block_on(|| async {
        let network = Network::up(&l.dirs, &l.cfg).await.unwrap();
        let rtnl = Rtnl::connect().unwrap();
        let mut held = Held::default();
        for tag in ["gone", "race"] {
            l.ns.exec_ok(&format!(
                "ip link add bqc-{tag} type veth peer name bqv-{tag}"
            ));
            let link = rtnl.link(&format!("bqc-{tag}")).await.unwrap().unwrap();
            held.veths.push(LinkRecord {
                name: link.name,
                ifindex: link.index,
                owner: Some(tag.into()),
            });
        }
        let files = NetFiles::new(&l.dirs);
        Owned::update(&files, |o| o.veths = held.veths.clone()).unwrap();

        // The race, pinned at the netlink call: the link vanishes after the lookup.
        l.ns.exec_ok("ip link del bqc-race");
        rtnl.delete(held.veths[1].ifindex)
            .await
            .expect("deleting a link that is already gone is done, not an error");
        // Gone before the release.
        l.ns.exec_ok("ip link del bqc-gone");
        confine::release(&network, held).await.unwrap();
        let owned = Owned::load(&files).unwrap();
        assert!(owned.veths.is_empty(), "{owned:?}");
        network.down().await.unwrap();
    });
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
            let fd = network.open_tap("boma-it-inner").await.unwrap();
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
