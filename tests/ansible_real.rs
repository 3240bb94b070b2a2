//! The ansible module against the real Ansible (ansible-core on PATH), without a VM: the profile,
//! the transient inventory as Ansible reads it, the safety checks, and playbook runs whose tasks
//! never connect (debug/fail/pause run on the controller).

use boma_qvm::Error;
use boma_qvm::ansible::certs::{CertOptions, CertPlan, CertTier};
use boma_qvm::ansible::{
    Connection, Playbook, Profile, RunOptions, Session, SessionConfig, Subnet,
};
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const VM: Ipv4Addr = Ipv4Addr::new(192, 168, 231, 20);

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/boma")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn config(dir: &Path, address: Ipv4Addr) -> SessionConfig {
    SessionConfig {
        dir: dir.join("ansible"),
        target: Connection::new(address, dir.join("id_ed25519")),
        subnet: "192.168.231.0/24".parse::<Subnet>().unwrap(),
        certs: CertPlan::internal(),
        extra_vars: vec![],
        secret_vars: vec![],
        confine: None,
    }
}

/// A var's effective value for askari as Ansible sees it with the session's layering.
fn effective(s: &Session, var: &str) -> Value {
    let tree = tempfile::tempdir().unwrap();
    // The same `ansible` boma-qvm runs (BOMA_QVM_ANSIBLE_DIR, else PATH).
    let out = std::process::Command::new(boma_qvm::ansible::find_tool("ansible").unwrap())
        .current_dir(&s.profile().repo)
        .args(["all", "-i"])
        .arg(s.inventory())
        .arg("--playbook-dir")
        .arg(&s.profile().repo)
        .args(s.extra_var_args())
        .args(["-m", "debug", "-a", &format!("var={var}"), "--tree"])
        .arg(tree.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let hosts: Vec<_> = std::fs::read_dir(tree.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        hosts,
        ["askari"],
        "only askari is in the transient inventory"
    );
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(tree.path().join("askari")).unwrap())
            .unwrap();
    v[var].clone()
}

#[test]
fn profile_loads_the_example_repo() {
    let p = Profile::load(&fixture(), "askari").unwrap();
    let mut groups = p.groups();
    groups.sort();
    assert_eq!(
        groups,
        [
            "coordinators",
            "docker_hosts",
            "mesh_peers",
            "reverse_proxies"
        ]
    );
    assert!(
        p.overlay
            .ends_with("tests/integration/overrides/askari.yml")
    );
    assert!(p.inventories[0].ends_with("inventory/hosts.yml"));
}

#[test]
fn profile_errors_name_the_missing_piece_and_the_fix() {
    let e = Profile::load(&fixture(), "twiga").unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("askari, kiboko"), "{e}");
    assert!(matches!(
        Profile::load(&fixture(), "askari,kiboko"),
        Err(Error::Input { .. })
    ));
    // ubongo is in the inventory but has no overlay.
    let e = Profile::load(&fixture(), "ubongo").unwrap_err();
    assert!(e.to_string().contains("overrides/ubongo.yml"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture(), tmp.path());
    std::fs::remove_file(tmp.path().join("tests/integration/verify.yml")).unwrap();
    let e = Profile::load(tmp.path(), "askari").unwrap_err();
    assert!(
        matches!(e, Error::NotFound { .. }) && e.to_string().contains("verify.yml"),
        "{e}"
    );

    write(tmp.path(), "tests/integration/verify.yml", "- hosts: all\n");
    write(
        tmp.path(),
        "ansible.cfg",
        "[defaults]\ninventory = nowhere.yml\n",
    );
    let e = Profile::load(tmp.path(), "askari").unwrap_err();
    assert!(e.to_string().contains("nowhere.yml"), "{e}");

    let e = Profile::load(&tmp.path().join("absent"), "askari").unwrap_err();
    assert!(
        matches!(e, Error::NotFound { .. }) && e.to_string().contains("--repo"),
        "{e}"
    );
}

#[test]
fn transient_inventory_applies_the_real_vars_and_the_layers_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Session::new(
        Profile::load(&fixture(), "askari").unwrap(),
        config(tmp.path(), VM),
    )
    .unwrap();
    // Connection: the VM, whatever host_vars/askari.yml and inventory group_vars/all.yml say.
    assert_eq!(effective(&s, "ansible_host"), "192.168.231.20");
    assert_eq!(effective(&s, "ansible_user"), "ansible");
    // Group depth precedence survived (reverse_proxies beats servers).
    assert_eq!(
        effective(&s, "base_firewall_tcp_ports"),
        serde_json::json!([22, 80, 443, 8080])
    );
    // Inventory-adjacent group_vars apply.
    assert_eq!(effective(&s, "boma_domain"), "wingu.me");
    // Playbook-adjacent host_vars apply.
    assert_eq!(effective(&s, "reverse_proxy_site_name"), "askari.wingu.me");
    // The overlay beats group_vars; the cert tier beats the overlay's placeholder.
    assert_eq!(
        effective(&s, "netbird_management_url"),
        "http://127.0.0.1:33073"
    );
    assert_eq!(effective(&s, "reverse_proxy_tls_mode"), "internal");
    // The real inventory was not touched.
    let real = std::fs::read_to_string(fixture().join("inventory/hosts.yml")).unwrap();
    assert!(real.contains("kiboko") && !real.contains("192.168.231"));
}

#[tokio::test]
async fn scope_check_accepts_the_vm_even_when_the_repo_and_the_user_name_the_real_address() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), VM);
    cfg.extra_vars = vec![
        "ansible_host=203.0.113.10".into(),
        "ansible_ssh_host=203.0.113.10".into(),
    ];
    let s = Session::new(Profile::load(&fixture(), "askari").unwrap(), cfg).unwrap();
    for pb in [Playbook::Site, Playbook::Verify] {
        let r = s.check_scope(pb).await.unwrap();
        assert_eq!(
            (r.host.as_str(), r.address, r.connection.as_str()),
            ("askari", VM, "ssh")
        );
    }
}

#[tokio::test]
async fn scope_check_refuses_an_address_outside_the_subnet() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Session::new(
        Profile::load(&fixture(), "askari").unwrap(),
        config(tmp.path(), Ipv4Addr::new(10, 9, 9, 9)),
    )
    .unwrap();
    let e = s.check_scope(Playbook::Site).await.unwrap_err();
    assert!(matches!(e, Error::Ansible { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("10.9.9.9, outside the isolated subnet"),
        "{e}"
    );
}

#[tokio::test]
async fn scope_check_refuses_a_second_host() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Session::new(
        Profile::load(&fixture(), "askari").unwrap(),
        config(tmp.path(), VM),
    )
    .unwrap();
    // Tamper with the transient inventory the way a bug would: a second host in a group.
    let text = std::fs::read_to_string(s.inventory()).unwrap();
    let mut doc: Value = serde_json::from_str(&text).unwrap();
    doc["all"]["children"]["servers"]["children"]["mesh_peers"]["hosts"]["kiboko"] =
        serde_json::json!({"ansible_host": "192.168.231.21"});
    std::fs::write(s.inventory(), doc.to_string()).unwrap();
    let e = s.check_scope(Playbook::Site).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("exactly one host, `askari`, but Ansible sees 2 (askari, kiboko)"),
        "{e}"
    );
}

#[tokio::test]
async fn scope_check_refuses_a_local_connection_set_by_the_repo() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    copy_dir(&fixture(), &repo);
    write(
        &repo,
        "host_vars/askari.yml",
        "ansible_host: 203.0.113.10\nansible_connection: local\n",
    );
    let s = Session::new(
        Profile::load(&repo, "askari").unwrap(),
        config(tmp.path(), VM),
    )
    .unwrap();
    let e = s.check_scope(Playbook::Site).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("effective ansible_connection is `local`"),
        "{e}"
    );
}

/// A minimal repo whose playbooks never connect to the host.
fn tiny_repo(root: &Path, site_tasks: &str, verify_tasks: &str) {
    write(
        root,
        "inventory/hosts.yml",
        "all:\n  children:\n    servers:\n      hosts:\n        askari:\n          ansible_host: 203.0.113.10\n",
    );
    let play = |tasks: &str| format!("- hosts: servers\n  gather_facts: false\n  tasks:\n{tasks}");
    write(root, "site.yml", &play(site_tasks));
    write(root, "tests/integration/verify.yml", &play(verify_tasks));
    write(
        root,
        "tests/integration/overrides/askari.yml",
        "stub: true\n",
    );
}

fn opts(dir: &Path, name: &str, secs: u64) -> RunOptions {
    RunOptions {
        log: dir.join(name),
        timeout: Duration::from_secs(secs),
        echo: false,
    }
}

#[tokio::test]
async fn playbook_runs_report_success_failure_and_the_recap() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    tiny_repo(
        &repo,
        "    - debug: msg=\"apply {{ stub }}\"\n",
        "    - fail: msg=\"published port 8080 is dead\"\n",
    );
    let s = Session::new(
        Profile::load(&repo, "askari").unwrap(),
        config(tmp.path(), VM),
    )
    .unwrap();

    let ok = s
        .run_playbook(Playbook::Site, &opts(tmp.path(), "apply.log", 120))
        .await
        .unwrap();
    assert!(ok.success, "{}", ok.summary());
    assert_eq!(ok.recap.unwrap().ok, 1);
    let log = std::fs::read_to_string(tmp.path().join("apply.log")).unwrap();
    assert!(
        log.contains("apply True") && log.contains("--limit askari") && !log.contains('\u{1b}'),
        "{log}"
    );
    ok.into_result().unwrap();

    let bad = s
        .run_playbook(Playbook::Verify, &opts(tmp.path(), "verify.log", 120))
        .await
        .unwrap();
    assert!(!bad.success);
    assert_eq!(bad.recap.unwrap().failed, 1);
    assert_eq!(bad.failures[0].message, "published port 8080 is dead");
    let e = bad.into_result().unwrap_err();
    assert!(
        matches!(e, Error::VerifyFailed { .. }) && e.to_string().contains("8080 is dead"),
        "{e}"
    );
}

#[tokio::test]
async fn a_failed_apply_is_an_ansible_error() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    tiny_repo(&repo, "    - fail: msg=boom\n", "    - debug: msg=ok\n");
    let s = Session::new(
        Profile::load(&repo, "askari").unwrap(),
        config(tmp.path(), VM),
    )
    .unwrap();
    let out = s
        .run_playbook(Playbook::Site, &opts(tmp.path(), "apply.log", 120))
        .await
        .unwrap();
    let e = out.into_result().unwrap_err();
    assert!(
        matches!(e, Error::Ansible { .. }) && e.to_string().contains("boom"),
        "{e}"
    );
}

#[tokio::test]
async fn the_credential_and_secret_vars_reach_ansible_but_never_the_log_and_their_file_is_removed()
{
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    // The apply prints both (also JSON-escaped in a result dump); the verify fails with both in
    // its message, as a real failure message might.
    tiny_repo(
        &repo,
        "    - debug: msg=\"key is {{ gandi_api_key }}, db is {{ db_password }}\"\n    \
         - debug: var=db_password\n",
        "    - fail: msg=\"db {{ db_password }} key {{ gandi_api_key }}\"\n",
    );
    let mut cfg = config(tmp.path(), VM);
    cfg.certs = CertTier::LeStaging
        .plan(&CertOptions::default(), |v| {
            (v == "GANDI_API_KEY").then(|| "s3cr3t-4pi-k3y".into())
        })
        .unwrap();
    cfg.secret_vars = vec![boma_qvm::ansible::Secret {
        var: "db_password".into(),
        value: "pa\"ss-w0rd-\u{e9}t\u{e9}".into(),
    }];
    let s = Session::new(Profile::load(&repo, "askari").unwrap(), cfg).unwrap();
    let out = s
        .run_playbook(Playbook::Site, &opts(tmp.path(), "apply.log", 120))
        .await
        .unwrap();
    assert!(out.success, "{}", out.summary());
    let verify = s
        .run_playbook(Playbook::Verify, &opts(tmp.path(), "verify.log", 120))
        .await
        .unwrap();
    let e = verify.into_result().unwrap_err().to_string();
    let log = std::fs::read_to_string(tmp.path().join("apply.log")).unwrap();
    assert!(
        log.contains("key is ********, db is ********"),
        "both reached Ansible and were scrubbed: {log}"
    );
    assert!(!tmp.path().join("ansible/secrets.json").exists());
    let mut texts = vec![("the verify error".to_string(), e)];
    for f in ["apply.log", "verify.log"] {
        texts.push((
            f.into(),
            std::fs::read_to_string(tmp.path().join(f)).unwrap(),
        ));
    }
    for f in ["certs.json", "connection.json", "inventory/hosts.json"] {
        let text = std::fs::read_to_string(tmp.path().join("ansible").join(f)).unwrap();
        texts.push((f.into(), text));
    }
    for (what, text) in texts {
        for secret in ["s3cr3t-4pi-k3y", "ss-w0rd", "w0rd-\\u00e9"] {
            assert!(!text.contains(secret), "{what} holds {secret}:\n{text}");
        }
    }
}

#[tokio::test]
async fn a_hung_playbook_is_killed_at_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    tiny_repo(&repo, "    - pause: seconds=120\n", "    - debug: msg=ok\n");
    let s = Session::new(
        Profile::load(&repo, "askari").unwrap(),
        config(tmp.path(), VM),
    )
    .unwrap();
    let e = s
        .run_playbook(Playbook::Site, &opts(tmp.path(), "apply.log", 8))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { secs: 8, .. }), "{e}");
    let ps = std::process::Command::new("pgrep")
        .args(["-f", &repo.join("site.yml").display().to_string()])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "ansible-playbook still running: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

#[tokio::test]
async fn verify_sees_the_vars_the_apply_saw() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let check = "    - assert: { that: [\"marker == 'verify-dir'\", \"far == 'repo-root'\"] }\n";
    tiny_repo(&repo, "    - debug: msg=\"{{ marker }}\"\n", check);
    write(
        &repo,
        "group_vars/servers.yml",
        "marker: repo-root\nfar: repo-root\n",
    );
    // Vars next to verify.yml itself load too, and win, as when running it in place.
    write(
        &repo,
        "tests/integration/group_vars/servers.yml",
        "marker: verify-dir\n",
    );
    let s = Session::new(
        Profile::load(&repo, "askari").unwrap(),
        config(tmp.path(), VM),
    )
    .unwrap();
    let out = s
        .run_playbook(Playbook::Verify, &opts(tmp.path(), "verify.log", 120))
        .await
        .unwrap();
    assert!(out.success, "{}", out.summary());
    // And the check saw one host only, through both inventory sources.
    assert_eq!(out.scope.address, VM);
}

#[tokio::test]
async fn an_unreachable_vm_is_reported_as_the_incident_signature() {
    // Nothing listens on 127.0.0.1:1: ssh is refused at once, without leaving this machine.
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    tiny_repo(&repo, "    - debug: msg=ok\n", "    - command: \"true\"\n");
    let mut cfg = config(tmp.path(), Ipv4Addr::LOCALHOST);
    cfg.subnet = "127.0.0.0/8".parse().unwrap();
    cfg.target.port = 1;
    let s = Session::new(Profile::load(&repo, "askari").unwrap(), cfg).unwrap();
    let out = s
        .run_playbook(Playbook::Verify, &opts(tmp.path(), "verify.log", 120))
        .await
        .unwrap();
    assert_eq!(out.recap.unwrap().unreachable, 1);
    let e = out.into_result().unwrap_err();
    assert!(matches!(e, Error::VerifyFailed { .. }), "{e}");
    assert!(e.to_string().contains("unreachable over SSH"), "{e}");
}
