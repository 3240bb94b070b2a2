//! The playbook's control-node side is confined (issue 12 part 3, ADR-026): every process a
//! cycle starts for Ansible runs in a network namespace that reaches only the VM network and
//! loopback. The fixture tasks run on the controller (implicit localhost, `delegate_to:
//! localhost`, `local_action`) and try a watched listener on the "LAN" and one on the
//! "internet" of a namespace world: nothing reaches either, the VM network still works, and
//! the run says why. The same playbook unconfined does reach the LAN listener (the test's own
//! proof that it can fail).

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boma_qvm::ansible::{
    CertPlan, Confine, Connection, Playbook, Profile, RunOptions, Session, SessionConfig, Subnet,
};
use boma_qvm::net::Network;
use boma_qvm::net::owned::Owned;
use common::users::{Netd, TestUser, out};
use common::world::{OUTSIDE, World};

/// A listener on `addr:port` in `ns` that appends every peer that connects to `log`; returns
/// once it listens.
fn watch(ns: &mut common::netns::Netns, addr: &str, port: u16, log: &Path) {
    let py = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{addr}', {port}))\ns.listen(16)\nwhile True:\n    c, a = s.accept()\n    \
         open('{}', 'a').write(a[0] + '\\n')\n    c.close()\n",
        log.display()
    );
    let script = log.with_extension("py");
    std::fs::write(&script, py).unwrap();
    ns.spawn(&format!("python3 {}", script.display()));
    for _ in 0..100 {
        if ns.exec_ok("ss -tlnH").contains(&format!("{addr}:{port}")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the watched listener on {addr}:{port} did not come up");
}

fn hits(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .count()
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A repo whose site.yml only runs tasks on the control node: they never connect to the VM.
fn repo(root: &Path, probe_file: &Path, vm: Ipv4Addr) {
    write(
        root,
        "inventory/hosts.yml",
        "all:\n  children:\n    servers:\n      hosts:\n        askari:\n          ansible_host: 203.0.113.10\n",
    );
    let site = format!(
        r#"- hosts: servers
  gather_facts: false
  tasks:
    - name: Where does a delegated task run, and on which network?
      ansible.builtin.shell: "(hostname; ip -4 route; ip -4 -o addr) > {probe}"
      delegate_to: localhost
    - name: The VM network is reachable from the control node (its fake sshd)
      ansible.builtin.wait_for:
        host: "{vm}"
        port: 22
        timeout: 10
      delegate_to: localhost
    - name: A delegated task reaches for the LAN
      ansible.builtin.uri:
        url: http://10.20.0.1:8099/
        timeout: 3
      delegate_to: localhost
      ignore_errors: true
    - name: A local_action reaches for the internet
      local_action:
        module: ansible.builtin.uri
        url: "http://{outside}:8099/"
        timeout: 3
      ignore_errors: true
    - name: A lookup reaches for the LAN
      ansible.builtin.debug:
        msg: "{{{{ lookup('ansible.builtin.url', 'http://10.20.0.1:8099/', errors='warn') }}}}"
      ignore_errors: true
    - name: Fail with what the LAN probe saw
      ansible.builtin.uri:
        url: http://10.20.0.1:8099/
        timeout: 3
      delegate_to: localhost
"#,
        probe = probe_file.display(),
        vm = vm,
        outside = OUTSIDE,
    );
    write(root, "site.yml", &site);
    write(
        root,
        "tests/integration/verify.yml",
        "- hosts: servers\n  gather_facts: false\n  tasks: []\n",
    );
    write(
        root,
        "tests/integration/overrides/askari.yml",
        "stub: true\n",
    );
}

fn session(tmp: &Path, repo: &Path, vm: Ipv4Addr, confine: Option<Confine>) -> Session {
    let profile = Profile::load_confined(
        repo,
        "askari",
        confine.as_ref().map(Confine::loopback).as_ref(),
    )
    .unwrap();
    Session::new(
        profile,
        SessionConfig {
            dir: tmp.join("ansible"),
            target: Connection::new(vm, tmp.join("id_ed25519")),
            subnet: "192.168.231.0/24".parse::<Subnet>().unwrap(),
            certs: CertPlan::internal(),
            extra_vars: vec![],
            secret_vars: vec![],
            confine,
        },
    )
    .unwrap()
}

fn opts(dir: &Path, name: &str) -> RunOptions {
    RunOptions {
        log: dir.join(name),
        timeout: Duration::from_secs(300),
        echo: false,
    }
}

fn confine(state: PathBuf, netd: Option<PathBuf>) -> Confine {
    Confine {
        exe: env!("CARGO_BIN_EXE_boma-qvm").into(),
        state,
        netd,
        loopback_only: false,
    }
}

/// Root without netd: `__confined` builds the veth itself on this state's bridge.
#[test]
fn delegated_tasks_lookups_and_local_actions_reach_only_the_vm_network() {
    let mut w = World::new();
    let tmp = tempfile::tempdir().unwrap();
    let lan_log = tmp.path().join("lan.log");
    let out_log = tmp.path().join("outside.log");
    watch(&mut w.host, "10.20.0.1", 8099, &lan_log);
    watch(&mut w.outside, OUTSIDE, 8099, &out_log);
    let network = w.host.block_on(|| Network::up(&w.dirs, &w.cfg)).unwrap();
    let vm_net = w
        .host
        .run(|| network.vm_net("boma-it-askari", vec![], true))
        .unwrap();
    w.host.run(|| network.register_vm(&vm_net)).unwrap();
    let vm = w.add_vm("boma-it-askari");
    assert_eq!(vm.dhcp().unwrap(), vm_net.ip);
    let probe = tmp.path().join("probe.txt");
    let repo_dir = tmp.path().join("repo");
    repo(&repo_dir, &probe, vm_net.ip);

    // Control: unconfined, the same playbook reaches the LAN listener.
    let s = session(tmp.path(), &repo_dir, vm_net.ip, None);
    let free = w
        .host
        .block_on(|| async {
            s.run_playbook(Playbook::Site, &opts(tmp.path(), "free.log"))
                .await
        })
        .unwrap();
    assert!(
        hits(&lan_log) >= 1,
        "the unconfined run should reach the LAN listener:\n{}",
        free.summary()
    );
    assert!(
        hits(&out_log) >= 1,
        "the unconfined run should reach the internet listener"
    );
    std::fs::remove_file(&lan_log).ok();
    std::fs::remove_file(&out_log).ok();

    let s = session(
        tmp.path(),
        &repo_dir,
        vm_net.ip,
        Some(confine(w.dirs.state.clone(), None)),
    );
    let run = w
        .host
        .block_on(|| async {
            s.run_playbook(Playbook::Site, &opts(tmp.path(), "apply.log"))
                .await
        })
        .unwrap();
    let summary = run.summary();
    eprintln!("{summary}");
    assert!(!run.success, "the last LAN probe must fail:\n{summary}");
    assert_eq!(run.failures.len(), 1, "only the last task fails: {summary}");
    assert!(
        run.failures[0].message.contains("Network is unreachable"),
        "{summary}"
    );
    assert!(
        summary.contains("why: the control node's side of the run is confined"),
        "{summary}"
    );
    assert_eq!(hits(&lan_log), 0, "a confined task reached the LAN");
    assert_eq!(hits(&out_log), 0, "a confined task reached the internet");

    // The delegated task ran here, on the controller, in the confined namespace.
    let seen = std::fs::read_to_string(&probe).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    assert!(
        seen.starts_with(&host),
        "implicit localhost is the controller:\n{seen}"
    );
    let (lo, hi) = w.cfg.confine_range();
    let addr = seen
        .lines()
        .filter(|l| l.contains("inet ") && l.contains("bqv-"))
        .find_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .split('/')
                .next()?
                .parse::<Ipv4Addr>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no confinement veth in:\n{seen}"));
    assert!(addr >= lo && addr <= hi, "{addr} outside {lo}-{hi}");
    assert!(!seen.contains("default"), "a default route inside:\n{seen}");
    let log = std::fs::read_to_string(tmp.path().join("apply.log")).unwrap();
    assert!(log.contains("# confined: this run"), "{log}");

    // Given back: no veth left, none recorded.
    assert!(
        !w.host.exec_ok("ip -o link").contains("bqc-"),
        "a veth was left"
    );
    let owned = Owned::load(&boma_qvm::net::files::NetFiles::new(&w.dirs)).unwrap();
    assert!(owned.veths.is_empty(), "{owned:?}");
    w.host.block_on(|| network.down()).unwrap();
}

/// An operator (not root) is confined through netd: it gets a veth into its own user and
/// network namespace, reaches the VM and nothing else, and the veth is gone afterwards.
#[test]
fn an_operator_is_confined_through_netd() {
    let mut w = World::new();
    let mut netd = Netd::start(&w.host, &[OUTSIDE]);
    let user = TestUser::new();
    let sock = netd.socket_env();
    let lan_log = user.dir.path().join("lan.log");
    watch(&mut w.host, "10.20.0.1", 8099, &lan_log);
    // netd brings its network up on the first request; then a "VM" joins the bridge.
    let o = user
        .cli(&[("BOMA_QVM_NETD_SOCKET", &sock)])
        .args(["net", "up"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let vm = w.add_vm("boma-it-fake");
    // Not registered, so no static lease: give it an address by hand.
    vm.ns.ip("addr add 192.168.231.200/24 dev eth0");

    let script = "set -x; busybox nc -w 3 192.168.231.200 22 </dev/null; \
                  echo | busybox nc -w 3 10.20.0.1 8099; echo lan=$?; \
                  ip -4 -o addr; echo uid=$(id -u)";
    let o = user
        .command(env!("CARGO_BIN_EXE_boma-qvm"), &[])
        .args(["__confined", "--netd", &sock, "--", "sh", "-c", script])
        .output()
        .unwrap();
    let t = out(&o);
    eprintln!("{t}");
    assert!(
        t.contains("SSH-2.0-fake-vm"),
        "the VM network is reachable:\n{t}"
    );
    assert!(
        t.contains("lan=1") && t.contains("Network is unreachable"),
        "{t}"
    );
    assert!(
        t.contains(&format!("uid={}", user.uid)),
        "the uid maps to itself (files keep their owner):\n{t}"
    );
    assert!(t.contains("bqv-") && t.contains("192.168.231."), "{t}");
    assert_eq!(
        hits(&lan_log),
        0,
        "the operator's confined process reached the LAN"
    );
    assert!(
        !w.host.exec_ok("ip -o link").contains("bqc-"),
        "netd left the veth"
    );
    let log = std::fs::read_to_string(&netd.log).unwrap_or_default();
    assert!(log.contains("confined pid"), "{log}");
    let o = user
        .cli(&[("BOMA_QVM_NETD_SOCKET", &sock)])
        .args(["net", "down"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    assert!(netd.stop().is_some_and(|s| s.success()));
}
