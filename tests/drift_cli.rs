//! `boma-qvm diff` without booting anything: the refusals name what is missing and the fix, and
//! on a VM that answers neither SSH nor the guest agent and printed nothing on its console the
//! diff still runs and says, per part, why it could not compare.

mod common;

use boma_qvm::cycle::CycleConfig;
use boma_qvm::cycle::drift::{GuestState, Part, Section, Source};
use boma_qvm::machine::Machine;
use common::{Env, Run, text};

#[test]
fn diff_refuses_without_a_cycle_or_its_post_apply_state_and_says_why_parts_are_missing() {
    let env = Env::new();
    let o = env.cli().run(&["diff", "ghost"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));

    // A VM that no cycle made.
    let m = Machine::create(&env.dirs, &env.guest_spec("drift", "")).unwrap();
    let o = env.cli().run(&["diff", "drift"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("a cycle for boma-it-drift does not exist"),
        "{}",
        text(&o)
    );

    // A cycle without the post-apply state (made by an older boma-qvm, say).
    let run = env.tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let cfg = CycleConfig {
        host: "drift".into(),
        repo: env.tmp.path().into(),
        certs: "internal".parse().unwrap(),
        prod_opt_in: false,
        extra_vars: vec![],
        secret_vars: vec![],
        keep: false,
        snapshot: false,
        verify_before_reboot: true,
        egress: true,
        subnet: "192.168.231.0/24".parse().unwrap(),
        runs_root: env.tmp.path().into(),
        run_dir: Some(run.clone()),
    };
    cfg.save(m.run_dir()).unwrap();
    let o = env.cli().run(&["diff", "drift"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("state-before-reboot.json") && text(&o).contains("fix: a cycle takes it"),
        "{}",
        text(&o)
    );

    // With it: nothing answers (no SSH key, QEMU not running, an empty console), and every
    // part says so instead of pretending nothing changed.
    let before = GuestState {
        when: "before reboot".into(),
        taken: 0.0,
        boot_id: None,
        system: None,
        fallback: None,
        sections: Part::ALL
            .into_iter()
            .map(|part| Section {
                part,
                source: Source::Ssh,
                lines: vec!["x".into()],
                note: None,
            })
            .collect(),
    };
    std::fs::write(
        run.join("state-before-reboot.json"),
        serde_json::to_string(&before).unwrap(),
    )
    .unwrap();
    let out = env.cli().ok(&["diff", "drift"]);
    eprintln!("{out}");
    assert!(
        out.starts_with("what changed from before reboot to now"),
        "{out}"
    );
    assert!(
        out.contains("note: now was read from the serial console, as far as it shows (ssh: ")
            && out.contains("guest agent: ")
            && out.contains("nft ruleset: not compared (now: not on the serial console)"),
        "{out}"
    );
    let now: GuestState =
        serde_json::from_str(&std::fs::read_to_string(run.join("state-now.json")).unwrap())
            .unwrap();
    assert!(
        now.sections.iter().all(|s| s.source != Source::Ssh),
        "{now:#?}"
    );
    assert!(
        std::fs::read_dir(&run).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("diff-")),
        "the diff is written beside the states"
    );
}
