//! Pure logic of the ansible module: cert tiers, safety judgements, output parsing, the transient
//! inventory document. (The same paths against the real Ansible are in ansible_real.rs.)

use boma_qvm::Error;
use boma_qvm::ansible::certs::{CertOptions, CertTier, LE_PROD_CA, LE_STAGING_CA};
use boma_qvm::ansible::inventory::{self, InventoryExport};
use boma_qvm::ansible::output::{parse_failures, parse_recap, redact, strip_ansi};
use boma_qvm::ansible::profile::{ini_value, validate_host_name};
use boma_qvm::ansible::safety::{Subnet, judge_inventory, judge_playbook, parse_list_hosts};
use boma_qvm::ansible::vars::Connection;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

fn key(name: &str) -> Option<String> {
    (name == "GANDI_API_KEY").then(|| "k3y-value".to_string())
}

fn lines(s: &str) -> Vec<String> {
    s.lines().map(String::from).collect()
}

// ---- cert tiers ----

#[test]
fn internal_tier_maps_to_caddy_tls_internal_without_credential() {
    let plan = CertTier::Internal
        .plan(
            &CertOptions {
                egress: false,
                ..Default::default()
            },
            |_| None,
        )
        .unwrap();
    assert_eq!(plan.vars["caddy_tls_directive"], "tls internal");
    assert_eq!(plan.vars["reverse_proxy_tls_mode"], "internal");
    assert_eq!(plan.vars["integration_cert_tier"], "internal");
    assert!(plan.secret.is_none());
    assert!(plan.accepted_risk.is_none());
}

#[test]
fn le_staging_uses_the_staging_ca_and_the_credential_from_the_environment() {
    let plan = CertTier::LeStaging
        .plan(&CertOptions::default(), key)
        .unwrap();
    assert_eq!(plan.vars["reverse_proxy_acme_ca"], LE_STAGING_CA);
    assert_eq!(plan.vars["reverse_proxy_tls_mode"], "acme_dns01");
    let directive = plan.vars["caddy_tls_directive"].as_str().unwrap();
    assert!(
        directive.contains(LE_STAGING_CA) && directive.contains("dns gandi"),
        "{directive}"
    );
    assert_eq!(plan.secret.as_ref().unwrap().value, "k3y-value");
    assert!(
        !format!("{plan:?}").contains("k3y-value"),
        "Debug must not print the credential"
    );
    assert!(
        !serde_json::to_string(&plan.vars)
            .unwrap()
            .contains("k3y-value")
    );
    assert!(plan.accepted_risk.is_none());
}

#[test]
fn le_prod_wildcard_needs_opt_in_and_returns_its_accepted_risk() {
    let refused = CertTier::LeProdWildcard
        .plan(&CertOptions::default(), key)
        .unwrap_err();
    assert!(matches!(refused, Error::Input { .. }), "{refused}");
    assert!(refused.to_string().contains("on demand"), "{refused}");

    let opts = CertOptions {
        prod_opt_in: true,
        ..Default::default()
    };
    let plan = CertTier::LeProdWildcard.plan(&opts, key).unwrap();
    assert_eq!(plan.vars["reverse_proxy_acme_ca"], LE_PROD_CA);
    assert_eq!(plan.vars["reverse_proxy_tls_wildcard"], "*.test.wingu.me");
    assert!(plan.accepted_risk.unwrap().contains("production Gandi"));
    assert!(plan.secret.is_some());
}

#[test]
fn le_tiers_refuse_without_egress_or_credential() {
    for tier in [CertTier::LeStaging, CertTier::LeProdWildcard] {
        let opts = CertOptions {
            egress: false,
            prod_opt_in: true,
            ..Default::default()
        };
        let e = tier.plan(&opts, key).unwrap_err();
        assert!(e.to_string().contains("needs egress"), "{e}");
        let opts = CertOptions {
            prod_opt_in: true,
            ..Default::default()
        };
        let e = tier.plan(&opts, |_| None).unwrap_err();
        assert!(e.to_string().contains("GANDI_API_KEY"), "{e}");
    }
}

#[test]
fn tier_names_round_trip_and_unknown_is_refused() {
    for t in CertTier::ALL {
        assert_eq!(t.as_str().parse::<CertTier>().unwrap(), t);
    }
    assert!(matches!(
        "letsencrypt".parse::<CertTier>(),
        Err(Error::Input { .. })
    ));
}

// ---- safety ----

fn probe(address: &str, connection: &str) -> Value {
    json!({"changed": false, "msg": {"address": address, "connection": connection}})
}

fn subnet() -> Subnet {
    "192.168.231.0/24".parse().unwrap()
}

#[test]
fn subnet_contains_only_its_addresses() {
    let s = subnet();
    assert!(s.contains(Ipv4Addr::new(192, 168, 231, 17)));
    assert!(!s.contains(Ipv4Addr::new(192, 168, 232, 17)));
    assert!(!s.contains(Ipv4Addr::new(203, 0, 113, 10)));
    assert!("10.1.2.3/8".parse::<Subnet>().is_err(), "host bits set");
    assert!("10.1.2.3".parse::<Subnet>().is_err());
    assert!("10.1.2.3/33".parse::<Subnet>().is_err());
}

#[test]
fn one_host_inside_the_subnet_over_ssh_is_accepted() {
    let r = BTreeMap::from([("askari".to_string(), probe("192.168.231.20", "ssh"))]);
    let (ip, conn) = judge_inventory(&r, "askari", subnet()).unwrap();
    assert_eq!(ip, Ipv4Addr::new(192, 168, 231, 20));
    assert_eq!(conn, "ssh");
}

#[test]
fn an_address_outside_the_subnet_is_refused() {
    let r = BTreeMap::from([("askari".to_string(), probe("203.0.113.10", "ssh"))]);
    let e = judge_inventory(&r, "askari", subnet()).unwrap_err();
    assert!(matches!(e, Error::Ansible { .. }));
    assert!(e.to_string().contains("outside the isolated subnet"), "{e}");
}

#[test]
fn two_hosts_are_refused() {
    let r = BTreeMap::from([
        ("askari".to_string(), probe("192.168.231.20", "ssh")),
        ("kiboko".to_string(), probe("192.168.231.21", "ssh")),
    ]);
    let e = judge_inventory(&r, "askari", subnet()).unwrap_err();
    assert!(e.to_string().contains("exactly one host"), "{e}");
    let e = judge_inventory(&BTreeMap::new(), "askari", subnet()).unwrap_err();
    assert!(e.to_string().contains("exactly one host"), "{e}");
}

#[test]
fn a_name_or_a_local_connection_is_refused() {
    let r = BTreeMap::from([("askari".to_string(), probe("askari.wingu.me", "ssh"))]);
    assert!(
        judge_inventory(&r, "askari", subnet())
            .unwrap_err()
            .to_string()
            .contains("not an IPv4")
    );
    let r = BTreeMap::from([("askari".to_string(), probe("192.168.231.20", "local"))]);
    assert!(
        judge_inventory(&r, "askari", subnet())
            .unwrap_err()
            .to_string()
            .contains("not ssh")
    );
}

#[test]
fn list_hosts_output_is_parsed_and_judged() {
    let out = "\nplaybook: site.yml\n\n  play #1 (servers): Servers\tTAGS: []\n    pattern: ['servers']\n    hosts (1):\n      askari\n\n  play #2 (localhost): x\tTAGS: []\n    pattern: ['localhost']\n    hosts (0):\n";
    let hosts = parse_list_hosts(out);
    assert_eq!(hosts, BTreeSet::from(["askari".to_string()]));
    judge_playbook(&hosts, "askari", "site.yml").unwrap();
    let two = parse_list_hosts("    hosts (2):\n      askari\n      kiboko\n");
    assert!(
        judge_playbook(&two, "askari", "site.yml")
            .unwrap_err()
            .to_string()
            .contains("kiboko")
    );
    assert!(
        judge_playbook(&BTreeSet::new(), "askari", "site.yml")
            .unwrap_err()
            .to_string()
            .contains("no play")
    );
}

#[test]
fn host_names_must_be_plain() {
    validate_host_name("askari").unwrap();
    validate_host_name("web-01.example").unwrap();
    for bad in [
        "all",
        "askari,kiboko",
        "*",
        "!kiboko",
        "",
        "localhost",
        "-x",
        "a b",
        "g:&h",
    ] {
        assert!(
            matches!(validate_host_name(bad), Err(Error::Input { .. })),
            "{bad}"
        );
    }
}

#[test]
fn connection_vars_override_both_spellings_and_keep_local_delegation_working() {
    let c = Connection::new(Ipv4Addr::new(192, 168, 231, 20), "/run/id_ed25519".into());
    let e = c.extra_vars();
    assert_eq!(e["ansible_host"], "192.168.231.20");
    assert_eq!(e["ansible_ssh_host"], "192.168.231.20");
    assert_eq!(e["ansible_user"], "ansible");
    let ssh = e["ansible_ssh_common_args"].as_str().unwrap();
    assert!(ssh.contains("UserKnownHostsFile=/dev/null"));
    // No ssh config file: neither the user's nor the system's (which ssh in the confined user
    // namespace can refuse; tests/host/readme-systemd.sh met that on Debian 13).
    assert!(ssh.starts_with("-F /dev/null "), "{ssh}");
    // These must not be extra vars: they would apply to `delegate_to: localhost` too.
    assert!(!e.contains_key("ansible_connection") && !e.contains_key("ansible_python_interpreter"));
    let i = c.inventory_vars();
    assert_eq!(i["ansible_connection"], "ssh");
    assert_eq!(i["ansible_python_interpreter"], "/usr/bin/python3");
}

// ---- output ----

#[test]
fn ansi_is_stripped_and_secrets_redacted() {
    assert_eq!(
        strip_ansi("\u{1b}[0;32mok: [askari]\u{1b}[0m"),
        "ok: [askari]"
    );
    assert_eq!(
        redact("key=abc123 again abc123", &["abc123".into(), String::new()]),
        "key=******** again ********"
    );
}

#[test]
fn recap_and_failures_are_read_from_default_callback_output() {
    let out = lines(
        r#"TASK [base : Firewall] *****
ok: [askari]

TASK [Probe the published port] *****
fatal: [askari -> localhost]: FAILED! => {"attempts": 4, "changed": false, "msg": "Status code was -1: timed out"}
...ignoring

TASK [Verdict] *****
fatal: [askari]: FAILED! => {
    "changed": false,
    "msg": "1 check(s) failed: published port 8080 is dead"
}

PLAY RECAP *****
askari                     : ok=12   changed=0    unreachable=0    failed=1    skipped=2    rescued=0    ignored=3   
"#,
    );
    let recap = parse_recap(&out, "askari").unwrap();
    assert_eq!(
        (recap.ok, recap.failed, recap.skipped, recap.ignored),
        (12, 1, 2, 3)
    );
    assert!(parse_recap(&out, "kiboko").is_none());
    let f = parse_failures(&out);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].task, "Verdict");
    assert_eq!(
        f[0].message,
        "1 check(s) failed: published port 8080 is dead"
    );
    assert!(!f[0].unreachable);

    let unreachable = lines(
        "TASK [x] ***\nfatal: [askari]: UNREACHABLE! => {\"changed\": false, \"msg\": \"ssh: connect to host 192.168.231.20 port 22: No route to host\", \"unreachable\": true}\n",
    );
    let f = parse_failures(&unreachable);
    assert!(
        f[0].unreachable && f[0].message.contains("No route"),
        "{f:?}"
    );
}

// ---- transient inventory document ----

fn export() -> InventoryExport {
    InventoryExport::parse(
        json!({
            "_meta": {"hostvars": {
                "askari": {"ansible_host": "203.0.113.10", "ansible_ssh_host": "203.0.113.10", "role_var": 1},
                "kiboko": {"ansible_host": "203.0.113.20"}}},
            "all": {"children": ["ungrouped", "servers", "control"], "vars": {"ansible_user": "sjat", "dom": "wingu.me"}},
            "servers": {"children": ["docker_hosts", "proxies", "mesh"], "vars": {"ports": [22]}},
            "docker_hosts": {"hosts": ["askari", "kiboko"]},
            "proxies": {"hosts": ["askari"], "vars": {"ports": [22, 8080]}},
            "mesh": {"hosts": ["kiboko"]},
            "control": {"hosts": ["ubongo"]},
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

#[test]
fn transient_inventory_holds_only_the_host_in_its_real_groups() {
    let vm = Connection::new(Ipv4Addr::new(192, 168, 231, 20), "/k".into()).inventory_vars();
    let t = inventory::build(&export(), "askari", &vm).unwrap();
    let all = &t.doc["all"];
    assert_eq!(
        all["vars"],
        json!({"dom": "wingu.me"}),
        "connection vars stripped from group vars"
    );
    let servers = &all["children"]["servers"];
    assert_eq!(servers["vars"]["ports"], json!([22]));
    let children: Vec<&String> = servers["children"].as_object().unwrap().keys().collect();
    assert_eq!(
        children,
        ["docker_hosts", "proxies"],
        "groups without askari are dropped"
    );
    assert!(all["children"].get("control").is_none() && all["children"].get("ungrouped").is_none());
    assert_eq!(
        servers["children"]["proxies"]["vars"]["ports"],
        json!([22, 8080])
    );

    let text = t.doc.to_string();
    assert!(
        !text.contains("kiboko") && !text.contains("ubongo") && !text.contains("203.0.113"),
        "{text}"
    );
    // Host vars appear once, with the VM's connection.
    let hv = &servers["children"]["docker_hosts"]["hosts"]["askari"];
    assert_eq!(hv["ansible_host"], "192.168.231.20");
    assert_eq!(hv["role_var"], 1);
    assert_eq!(servers["children"]["proxies"]["hosts"]["askari"], json!({}));
    for s in [
        "askari:ansible_host",
        "askari:ansible_ssh_host",
        "all:ansible_user",
    ] {
        assert!(t.stripped.contains(&s.to_string()), "{:?}", t.stripped);
    }
}

#[test]
fn unknown_host_is_not_found() {
    let e = inventory::build(&export(), "twiga", &Default::default()).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }));
}

#[test]
fn ansible_cfg_inventory_is_read() {
    let cfg = "# c\n[defaults]\nroles_path = roles\ninventory = inventory/hosts.yml\n[ssh_connection]\ninventory = no\n";
    assert_eq!(
        ini_value(cfg, "defaults", "inventory").as_deref(),
        Some("inventory/hosts.yml")
    );
    assert_eq!(ini_value(cfg, "defaults", "missing"), None);
}
