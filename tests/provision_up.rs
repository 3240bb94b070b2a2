//! `Machine::up` on the isolated network (inside a namespace this test creates).

mod common;

use boma_qvm::Error;
use boma_qvm::machine::accel::Accel;
use boma_qvm::machine::{Machine, OsSource, UpRequest};
use boma_qvm::stage::Stages;
use common::netns::Netns;
use common::*;

fn guest_request(host: &str, append: &str) -> UpRequest {
    let (kernel, initrd) = test_guest();
    let os = OsSource::Kernel {
        kernel,
        initrd: Some(initrd),
        append: format!("console=ttyS0 {append}"),
    };
    let mut req = UpRequest::new(host, os, Accel::Tcg);
    req.cpus = 1;
    req.memory_mib = 256;
    req.start = start_options();
    req
}

#[test]
fn a_first_boot_kernel_panic_is_retried_once_then_reported() {
    let env = Env::new();
    let ns = Netns::new("panic");
    let req = guest_request("panicky", "boma.net=1 boma.panic=1");
    let mut stages = Stages::new();
    let err = ns
        .block_on(|| Machine::up_staged(&env.dirs, &req, &mut stages))
        .err()
        .expect("a guest that always panics");
    assert!(matches!(err.inner(), Error::GuestFailure { .. }), "{err}");
    let boots = stages.records.iter().filter(|s| s.name == "boot").count();
    assert_eq!(boots, 2, "booted twice: the retry happened");
    let kept: Vec<_> = std::fs::read_dir(env.dirs.state.join("retries"))
        .unwrap()
        .collect();
    assert_eq!(kept.len(), 1, "the first panicked console is kept");
    let text = std::fs::read_to_string(kept[0].as_ref().unwrap().path()).unwrap();
    assert!(text.contains("Kernel panic"), "{text}");
    // The retry is recorded for the report: the failed stage marked, the reason, the console.
    assert_eq!(stages.retries.len(), 1, "{:?}", stages.retries);
    let r = &stages.retries[0];
    assert!(r.reason.contains("kernel panicked"), "{r:?}");
    assert_eq!(
        r.console.as_deref(),
        Some(kept[0].as_ref().unwrap().path().as_path())
    );
    let retried: Vec<_> = stages.records.iter().filter(|s| s.retried).collect();
    assert_eq!(retried.len(), 1, "{:?}", stages.records);
    assert_eq!(retried[0].name, r.stage);
    assert!(
        stages.failed().is_some_and(|f| !f.retried),
        "the second attempt's failure is the verdict"
    );
}

#[test]
fn up_gets_a_lease_and_teardown_leaves_no_network_behind() {
    let env = Env::new();
    let ns = Netns::new("up");
    let req = guest_request("leased", "boma.net=1");
    let m = ns.block_on(|| Machine::up(&env.dirs, &req)).unwrap();
    let ip = m.ip().expect("a lease");
    let echoed = ns.exec_ok(&format!(
        "echo 'echo $((6*7))' | timeout 10 busybox nc {ip} 7000"
    ));
    assert_eq!(
        echoed.trim(),
        "42",
        "the host reaches the VM on its lease address"
    );
    ns.block_on(|| m.down()).unwrap();
    let left = ns.leftovers(&env.dirs.state);
    assert!(left.is_empty(), "left behind:\n{left}");
}
