//! Network faults on a real test guest on the isolated network, all inside the test world's
//! namespaces (tests/common/world.rs): link loss on the NIC, and lost egress — the design's
//! FRICTION #4, "egress lost -> a service notices" — as a short scenario.

mod common;

use boma_qvm::machine::Machine;
use common::faults::*;
use common::world::{OUTSIDE, World};
use std::time::Duration;

/// Bring the guest up on the world's network, run `scenario`, tear the VM and network down.
fn in_world<F, Fut>(host: &str, append: &str, scenario: F)
where
    F: FnOnce(Machine) -> Fut + Send,
    Fut: std::future::Future<Output = Machine>,
{
    let _one = one_vm_at_a_time();
    let w = World::new();
    w.host.block_on(|| async {
        let req = net_guest_request(host, append, &w.cfg);
        let vm = Machine::up(&w.dirs, &req).await.unwrap();
        vm.expect_console("BOMA-TESTGUEST-READY", T).await.unwrap();
        let vm = scenario(vm).await;
        vm.down().await.unwrap();
    });
}

#[test]
fn link_down_cuts_the_vm_off_and_link_up_brings_it_back_without_a_reboot() {
    in_world("link", "", |vm| async move {
        let ip = vm.ip().unwrap();
        let hi = guest_cmd(ip, "echo hello", T).await.unwrap();
        assert_eq!(hi.trim(), "hello", "control: the host reaches the guest");

        vm.link(false).await.unwrap();
        let r = guest_cmd(ip, "echo hello", Duration::from_secs(5)).await;
        assert!(r.is_err(), "reached the guest with its link down: {r:?}");

        vm.link(true).await.unwrap();
        let mut back = Err(String::new());
        for _ in 0..20 {
            back = guest_cmd(ip, "echo hello", Duration::from_secs(5)).await;
            if back.is_ok() {
                break;
            }
        }
        assert_eq!(back.unwrap().trim(), "hello", "link up brings it back");
        assert_eq!(boots(&vm), 1, "without a reboot");
        assert_in_order(&timeline(&vm), &["FAULT:link-down", "FAULT:link-up"]);
        vm
    });
}

/// FRICTION #4: a service that needs the internet (NetBird's server FATAL-loops without it)
/// must notice when egress is lost, and recover when it returns. The guest's probe loop stands
/// in for the service: it connects to a web server "outside" every 2 s and says ok or fail.
#[test]
fn egress_lost_a_service_notices() {
    let probe = format!("boma.probe={OUTSIDE}:80");
    in_world("svc", &probe, |vm| async move {
        vm.expect_console("PROBE ok", T).await.unwrap();

        vm.egress(false).await.unwrap();
        vm.expect_console("PROBE fail", T).await.unwrap();
        // Only outbound traffic is cut: the host still reaches the VM.
        let ip = vm.ip().unwrap();
        assert_eq!(guest_cmd(ip, "echo up", T).await.unwrap().trim(), "up");

        vm.egress(true).await.unwrap();
        vm.expect_console("PROBE ok", T).await.unwrap();
        assert_in_order(&timeline(&vm), &["FAULT:egress-off", "FAULT:egress-on"]);
        vm
    });
}
