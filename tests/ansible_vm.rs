//! The example repo's site.yml / verify.yml through `Session` against a VM that is already up
//! (until the core's `cycle` drives this itself). Ignored by default; run by hand:
//!
//! ```text
//! BOMA_QVM_IT_ADDRESS=192.168.231.80 BOMA_QVM_IT_KEY=/tmp/vm/id_ed25519 BOMA_QVM_IT_NETNS=ns \
//! BOMA_QVM_IT_FIX=1 BOMA_QVM_IT_EXPECT=fail BOMA_QVM_IT_LOGS=/tmp/vm/logs \
//!   cargo test --test ansible_vm -- --ignored --nocapture vm_verify
//! ```
//!
//! `BOMA_QVM_IT_FIX=1` adds `-e docker_host_container_forward=true`; `BOMA_QVM_IT_EXPECT` is
//! `pass` (default) or `fail`, and a verify that must fail must fail on the published port.

use boma_qvm::ansible::certs::CertPlan;
use boma_qvm::ansible::{Connection, Playbook, PlaybookOutcome, Profile, RunOptions, Session, SessionConfig};
use std::path::{Path, PathBuf};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

async fn run(pb: Playbook) -> PlaybookOutcome {
    let address = env("BOMA_QVM_IT_ADDRESS").expect("BOMA_QVM_IT_ADDRESS").parse().unwrap();
    let key = PathBuf::from(env("BOMA_QVM_IT_KEY").expect("BOMA_QVM_IT_KEY"));
    let logs = PathBuf::from(env("BOMA_QVM_IT_LOGS").unwrap_or_else(|| "/tmp/boma-qvm-it-logs".into()));
    let mut extra_vars = vec![];
    if env("BOMA_QVM_IT_FIX").as_deref() == Some("1") {
        extra_vars.push("docker_host_container_forward=true".to_string());
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/boma");
    let cfg = SessionConfig {
        dir: logs.join("session"),
        target: Connection::new(address, key),
        subnet: "192.168.231.0/24".parse().unwrap(),
        certs: CertPlan::internal(),
        extra_vars,
        netns: env("BOMA_QVM_IT_NETNS"),
    };
    let session = Session::new(Profile::load(&repo, "askari").unwrap(), cfg).unwrap();
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let log = logs.join(format!("{stamp}-{}.log", pb.name()));
    let opts = RunOptions { log, timeout: pb.default_timeout(), echo: true };
    let out = session.run_playbook(pb, &opts).await.unwrap();
    eprintln!("\n== {}", out.summary());
    out
}

fn expect_pass() -> bool {
    env("BOMA_QVM_IT_EXPECT").as_deref() != Some("fail")
}

#[tokio::test]
#[ignore = "needs a running VM; see the file's doc"]
async fn vm_apply() {
    let out = run(Playbook::Site).await;
    assert!(out.success, "{}", out.summary());
}

#[tokio::test]
#[ignore = "needs a running VM; see the file's doc"]
async fn vm_verify() {
    let out = run(Playbook::Verify).await;
    if expect_pass() {
        assert!(out.success, "{}", out.summary());
    } else {
        assert!(!out.success, "verify passed but was expected to fail");
        let msg = &out.failures.last().expect("a failure").message;
        assert!(msg.contains("published port") && msg.contains("is dead"), "{msg}");
        assert_eq!(out.failures.len(), 1, "only the port check fails: {:?}", out.failures);
    }
}
