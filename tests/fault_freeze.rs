//! Freeze/thaw and NMI against real QEMU under TCG with the busybox test guest, whose
//! `boma.tick=1` loop prints its system clock and its RTC every second.

mod common;

use common::faults::*;
use common::*;
use std::time::Duration;

const FROZEN: Duration = Duration::from_secs(6);

/// `BOMA-TESTGUEST-TICK <system epoch> rtc=<RTC epoch>` -> (system, rtc); None for a line the
/// freeze cut short.
fn tick(line: &str) -> Option<(i64, i64)> {
    let mut w = line
        .split_whitespace()
        .skip_while(|w| !w.ends_with("BOMA-TESTGUEST-TICK"));
    let sys = w.nth(1)?.parse().ok()?;
    let rtc = w.next()?.strip_prefix("rtc=")?.parse().ok()?;
    Some((sys, rtc))
}

#[tokio::test]
async fn a_frozen_vm_is_silent_and_ticks_again_after_thaw_with_its_rtc_caught_up() {
    let _one = one_vm_at_a_time();
    let env = Env::new();
    let vm = boot(&env, "freeze", "boma.tick=1").await;
    vm.expect_console("BOMA-TESTGUEST-TICK", T).await.unwrap();

    let e = vm.thaw().await.unwrap_err();
    assert!(e.to_string().contains("is not frozen"), "{e}");

    vm.freeze().await.unwrap();
    let at_freeze = vm.console_len();
    let e = vm.freeze().await.unwrap_err();
    assert!(e.to_string().contains("already frozen"), "{e}");
    tokio::time::sleep(FROZEN).await;
    assert_eq!(
        vm.console_len(),
        at_freeze,
        "the guest printed while frozen: {:?}",
        vm.console_since(at_freeze)
    );
    let log = vm.console_since(0);
    let (sys0, rtc0) = log.lines().filter_map(tick).next_back().unwrap();

    vm.skip_console();
    vm.thaw().await.unwrap();
    let line = vm.expect_console("BOMA-TESTGUEST-TICK", T).await.unwrap();
    let (sys1, rtc1) = tick(&line).unwrap_or_else(|| panic!("unparsable tick {line:?}"));
    // The RTC kept host time while the VM was frozen, so the guest can see the gap ...
    assert!(
        rtc1 - rtc0 >= FROZEN.as_secs() as i64,
        "rtc {rtc0} -> {rtc1}"
    );
    // ... but its system clock stood still: it lags by about the time frozen (TCG stops the
    // TSC with the VM). Nothing in the guest corrects it short of NTP or `hwclock -s`.
    let lag = (rtc1 - rtc0) - (sys1 - sys0);
    assert!(
        lag >= FROZEN.as_secs() as i64 - 2,
        "system clock lag {lag}s"
    );
    eprintln!(
        "frozen {FROZEN:?}: RTC +{}s, system clock +{}s (lag {lag}s)",
        rtc1 - rtc0,
        sys1 - sys0
    );

    assert_in_order(
        &timeline(&vm),
        &["FAULT:freeze", "STOP", "FAULT:thaw", "RESUME"],
    );
    assert_eq!(boots(&vm), 1);
}

#[tokio::test]
async fn an_nmi_shows_on_the_guest_console_and_in_the_events() {
    let _one = one_vm_at_a_time();
    let env = Env::new();
    let vm = boot(&env, "nmi", "").await;
    assert_eq!(vm.console_count("NMI received"), 0);
    let rec = vm.nmi().await.unwrap();
    assert_eq!(rec.data["kind"], "nmi");
    let line = vm.expect_console("NMI received", T).await.unwrap();
    assert!(line.contains("Uhhuh"), "{line}");
    assert!(timeline(&vm).contains(&"FAULT:nmi".to_string()));
    assert!(vm.is_running(), "an unknown NMI is survivable");
}
