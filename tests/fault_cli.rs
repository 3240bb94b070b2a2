//! `boma-qvm fault` from the shell, against a real test guest under TCG.

mod common;

use common::faults::*;
use common::*;

#[tokio::test]
async fn fault_freeze_and_thaw_from_the_shell_and_a_clear_refusal_on_a_stopped_vm() {
    let _one = one_vm_at_a_time();
    let env = Env::new();
    let vm = boot(&env, "clif", "boma.tick=1").await;
    let fault = |what: &str| env.cli().run(&["fault", "clif", what]);

    let o = fault("freeze");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("boma-it-clif: freeze: stop"),
        "{}",
        text(&o)
    );
    let at_freeze = vm.console_len();
    let o = fault("freeze");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already frozen"),
        "{}",
        text(&o)
    );
    assert_eq!(vm.console_len(), at_freeze, "frozen: no console output");

    let o = fault("thaw");
    assert!(o.status.success(), "{}", text(&o));
    vm.expect_console("BOMA-TESTGUEST-TICK", T).await.unwrap();
    assert_in_order(
        &timeline(&vm),
        &["FAULT:freeze", "STOP", "FAULT:thaw", "RESUME"],
    );

    let o = fault("power-cut");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("SIGKILL"),
        "{}",
        text(&o)
    );

    // A fault on a stopped VM: non-zero, the state named, the fix given.
    let o = fault("link-down");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot inject link-down")
            && err.contains("is not running")
            && err.contains("fix:"),
        "{}",
        text(&o)
    );

    let o = fault("power-on");
    assert!(o.status.success(), "{}", text(&o));
    vm.expect_console(READY, T).await.unwrap();
    let o = env
        .cli()
        .args(["fault", "nosuchvm", "nmi"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
}
