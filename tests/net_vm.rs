//! The isolation promise with a real VM (the busybox test guest on the isolated network, inside
//! the test world's namespaces): a VM started with --no-egress reaches nothing beyond its
//! subnet; with egress on it reaches the "internet" but still not the LAN, the mesh, or the
//! host's own services; the host reaches it all along.

mod common;

use boma_qvm::machine::Machine;
use common::faults::*;
use common::world::{OUTSIDE, World};
use std::time::Duration;

/// Targets the guest tries to open TCP connections to, and what each stands for.
const TARGETS: &[(&str, &str)] = &[
    ("198.51.100.2:80", "the internet"),
    ("10.20.0.1:8081", "a LAN address on the host itself"),
    ("172.16.9.2:80", "a LAN host behind the host"),
    ("100.64.1.2:80", "a mesh host"),
    ("192.168.231.1:8082", "a host service on the bridge address"),
];

/// `target -> reached?` as the guest sees it.
async fn reach(ip: std::net::Ipv4Addr) -> Vec<(String, bool)> {
    let script: String = TARGETS
        .iter()
        .map(|(t, _)| {
            let (h, p) = t.split_once(':').unwrap();
            format!("if nc -w 3 {h} {p} </dev/null >/dev/null 2>&1; then echo '{t} ok'; else echo '{t} fail'; fi; ")
        })
        .collect();
    let out = guest_cmd(ip, &script, Duration::from_secs(60))
        .await
        .unwrap();
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(t, r)| (t.to_string(), r == "ok"))
        .collect()
}

#[test]
fn a_vm_reaches_the_internet_only_with_egress_and_never_the_lan_the_mesh_or_the_host() {
    let _one = one_vm_at_a_time();
    let w = World::new();
    w.host.block_on(|| async {
        let mut req = net_guest_request("iso", "", &w.cfg);
        req.egress = false; // `boma-qvm up --no-egress`
        let vm = Machine::up(&w.dirs, &req).await.unwrap();
        vm.expect_console("BOMA-TESTGUEST-READY", T).await.unwrap();
        let ip = vm.ip().unwrap();
        assert_eq!(
            guest_cmd(ip, "echo hi", T).await.unwrap().trim(),
            "hi",
            "the host reaches the VM"
        );

        let blocked = reach(ip).await;
        assert_eq!(blocked.len(), TARGETS.len(), "{blocked:?}");
        for (t, ok) in &blocked {
            assert!(!ok, "with --no-egress the VM reached {t}");
        }

        vm.egress(true).await.unwrap();
        let open = reach(ip).await;
        for ((t, ok), (_, what)) in open.iter().zip(TARGETS) {
            let want = t.starts_with(OUTSIDE);
            assert_eq!(*ok, want, "{t} ({what}): reached={ok}, expected {want}");
        }
        vm.down().await.unwrap();
    });
}
