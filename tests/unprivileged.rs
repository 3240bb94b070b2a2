//! Operators run boma-qvm without sudo (issue 12 parts 1 and 2): a real unprivileged user the
//! test creates (groups boma-qvm and kvm) runs the busybox guest WITH a network through a real
//! netd (root, in a network namespace the test made): up, status, a lease and its command
//! service, egress-off/on, reboot, shutdown, start, console --log, down, prune. QEMU runs as that user, in its sandbox;
//! dnsmasq as nobody; another user's requests about the VM are refused; nothing is left.

mod common;

use boma_qvm::machine::procs;
use common::netns::Netns;
use common::users::{Netd, TestUser, out};
use common::{READY, test_guest};

fn guest(user: &TestUser, host: &str) -> Vec<String> {
    let (k, i) = test_guest();
    common::guest_up_args(
        host,
        &user.give(&k),
        &user.give(&i),
        "console=ttyS0 boma.net=1",
    )
}

/// `status HOST`'s `key=value`.
fn field(status: &str, key: &str) -> String {
    status
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {status}"))
        .to_string()
}

fn ok(c: &mut std::process::Command, args: &[String]) -> String {
    let o = c.args(args).output().unwrap();
    assert!(
        o.status.success(),
        "`boma-qvm {}` failed:\n{}",
        args.join(" "),
        out(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(a: &[&str]) -> Vec<String> {
    a.iter().map(|x| x.to_string()).collect()
}

#[test]
fn an_operator_runs_a_networked_vm_without_sudo_through_netd() {
    let ns = Netns::new("op");
    let mut netd = Netd::start(&ns, &["192.0.2.53"]);
    let user = TestUser::new();
    let sock = netd.socket_env();
    let env = [("BOMA_QVM_NETD_SOCKET", sock.as_str())];
    let cli = || user.cli(&env);

    ok(&mut cli(), &guest(&user, "op"));
    let status = ok(&mut cli(), &s(&["status", "op"]));
    assert!(
        status.contains(&format!("qemu-user={}", user.name)),
        "{status}"
    );
    assert!(status.contains(&format!("netd at {sock}")), "{status}");
    let qemu: i32 = field(&status, "qemu-pid").parse().unwrap();
    assert_eq!(
        procs::uid(qemu),
        Some(user.uid),
        "QEMU runs as the operator"
    );
    let argv = procs::cmdline(qemu);
    let at = argv.iter().position(|a| a == "-sandbox").expect("-sandbox");
    assert!(argv[at + 1].starts_with("on,"), "{argv:?}");
    let console = std::fs::read_to_string(user.state().join("vms/boma-it-op/console.log")).unwrap();
    assert!(console.contains(READY), "{console}");

    // dnsmasq is netd's and runs as nobody.
    common::assert_dnsmasq_runs_as_nobody(&netd.state.join("net/dnsmasq.pid"));

    // The lease, and the guest's command service on it (ssh-less).
    let ip = field(&status, "ip");
    let answer = ns.exec_ok(&format!(
        "echo 'echo $((6*7))' | timeout 10 busybox nc {ip} 7000"
    ));
    assert_eq!(answer.trim(), "42");

    // Egress off and on again, through netd.
    ok(&mut cli(), &s(&["fault", "op", "egress-off"]));
    assert!(
        ns.exec_ok("nft list set inet boma_qvm no_egress")
            .contains(&ip),
        "egress-off did not reach the table"
    );
    ok(&mut cli(), &s(&["fault", "op", "egress-on"]));
    assert!(
        !ns.exec_ok("nft list set inet boma_qvm no_egress")
            .contains(&ip)
    );
    ok(&mut cli(), &s(&["reboot", "op"]));

    // Off and on again: `start` brings the VM's tap back through netd, and the guest gets
    // its lease again. First the rebooted guest must be up (its power-button handler too).
    let console_log = user.state().join("vms/boma-it-op/console.log");
    for _ in 0..240 {
        let text = std::fs::read_to_string(&console_log).unwrap_or_default();
        if text.matches(READY).count() >= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let off = ok(&mut cli(), &s(&["shutdown", "op"]));
    assert!(off.contains("shut down cleanly"), "{off}");
    ok(&mut cli(), &s(&["start", "op"]));
    let mut answer = String::new();
    for _ in 0..60 {
        let o = ns.exec(&format!(
            "echo 'echo $((6*7))' | timeout 5 busybox nc {ip} 7000"
        ));
        answer = String::from_utf8_lossy(&o.stdout).into_owned();
        if answer.trim() == "42" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert_eq!(answer.trim(), "42", "the guest is back on netd's network");
    let log = ok(&mut cli(), &s(&["console", "op", "--log"]));
    assert!(log.matches(READY).count() >= 3, "{log}");

    // Another user's requests about this VM are refused by netd (SO_PEERCRED).
    let other = TestUser::new();
    let raw = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect('{sock}'); \
         s.sendall(b'{{\"op\":\"egress\",\"vm\":\"boma-it-op\",\"on\":false}}\\n'); \
         print(s.recv(4096).decode())"
    );
    let o = other
        .command("python3", &[])
        .args(["-c", &raw])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&o.stdout);
    assert!(
        answer.contains("\"Err\"") && answer.contains(&format!("belongs to uid {}", user.uid)),
        "{}",
        out(&o)
    );
    assert!(
        !ns.exec_ok("nft list set inet boma_qvm no_egress")
            .contains(&ip)
    );
    let mut theirs = guest(&other, "op");
    theirs[1] = "op".into();
    let o = other.cli(&env).args(&theirs).output().unwrap();
    assert_eq!(o.status.code(), Some(11), "{}", out(&o));
    assert!(out(&o).contains("belongs to uid"), "{}", out(&o));
    drop(other);

    ok(&mut cli(), &s(&["down", "op"]));
    let pruned = ok(&mut cli(), &s(&["prune"]));
    assert!(pruned.contains("pruned 0 VM(s)"), "{pruned}");
    assert!(
        user.pids().is_empty(),
        "the operator's processes are gone: {:?}",
        user.pids()
    );
    let status = netd.stop().expect("netd ran");
    assert!(status.success(), "netd: {status}\n{}", netd.log_text());
    let left = ns.leftovers(&netd.state);
    assert!(left.is_empty(), "left behind:\n{left}");
    assert!(!netd.socket.exists(), "netd removed its socket");
}

/// Root with a netd socket goes through netd too; QEMU then runs as the dedicated account.
#[test]
fn root_with_netd_uses_it_and_qemu_runs_as_the_account() {
    let ns = Netns::new("rn");
    let mut netd = Netd::start(&ns, &[]);
    let env = common::Env::new();
    let sock = netd.socket_env();
    let (k, i) = test_guest();
    let mut c = env.cli();
    c.env("BOMA_QVM_NETD_SOCKET", &sock);
    let o = c
        .args(["up", "rn", "--kernel"])
        .arg(&k)
        .arg("--initrd")
        .arg(&i)
        .args([
            "--append",
            "console=ttyS0 boma.net=1",
            "--memory",
            "256",
            "--cpus",
            "1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let mut c = env.cli();
    c.env("BOMA_QVM_NETD_SOCKET", &sock);
    let status =
        String::from_utf8_lossy(&c.args(["status", "rn"]).output().unwrap().stdout).into_owned();
    assert!(status.contains("qemu-user=boma-qvm-qemu"), "{status}");
    assert!(
        status.contains("owner uid 0"),
        "registered through netd: {status}"
    );
    let log = netd.log_text();
    assert!(log.contains("uid 0 ") && log.contains("Tap"), "{log}");
    let mut c = env.cli();
    c.env("BOMA_QVM_NETD_SOCKET", &sock);
    assert!(c.args(["down", "rn"]).output().unwrap().status.success());
    assert!(
        netd.stop().is_some_and(|s| s.success()),
        "{}",
        netd.log_text()
    );
    let left = ns.leftovers(&netd.state);
    assert!(left.is_empty(), "left behind:\n{left}");
}

/// A user who is not root and has no netd gets the fix, not a netlink EPERM.
#[test]
fn without_netd_an_operator_is_told_how_to_get_one() {
    let user = TestUser::new();
    let missing = user.dir.path().join("no.sock");
    let o = user
        .cli(&[("BOMA_QVM_NETD_SOCKET", missing.to_str().unwrap())])
        .args(["net", "status"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(11), "{}", out(&o));
    let t = out(&o);
    assert!(
        t.contains("cannot reach boma-qvm netd") && t.contains("systemctl start boma-qvm-netd"),
        "{t}"
    );
    let o = user
        .cli(&[("BOMA_QVM_NETD_SOCKET", "none")])
        .args(guest(&user, "nonet"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(11), "{}", out(&o));
    assert!(out(&o).contains("join group boma-qvm"), "{}", out(&o));
    assert!(
        !user.state().join("vms/boma-it-nonet").exists(),
        "refused before anything was made"
    );
}

/// An operator's `cycle` reads the shared cache (root:kvm, not group-writable) and never needs
/// to write it; when the image it needs is not there, it is refused before anything is made,
/// with the fix (root adds images). Seen failing before: every operator `cycle` stopped at
/// "the cache directory ... is not writable by this user", image or not.
#[test]
fn an_operator_cycle_reads_the_shared_cache_and_a_missing_image_is_roots_to_add() {
    use std::os::unix::fs::PermissionsExt;
    let ns = Netns::new("sc");
    let mut netd = Netd::start(&ns, &["192.0.2.53"]);
    let user = TestUser::new();
    let cache = user.dir.path().join("shared-cache");
    std::fs::create_dir_all(cache.join("images")).unwrap();
    let kvm = nix::unistd::Group::from_name("kvm").unwrap().unwrap().gid;
    for d in [&cache, &cache.join("images")] {
        nix::unistd::chown(d, Some(nix::unistd::Uid::from_raw(0)), Some(kvm)).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o2750)).unwrap();
    }
    let sock = netd.socket_env();
    let o = user
        .cli(&[
            ("BOMA_QVM_NETD_SOCKET", sock.as_str()),
            ("BOMA_QVM_CACHE_DIR", cache.to_str().unwrap()),
        ])
        .args(["cycle", "askari", "--certs", "internal", "--repo"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/boma"))
        .output()
        .unwrap();
    let t = out(&o);
    assert!(!o.status.success(), "{t}");
    assert!(!t.contains("not writable by this user"), "{t}");
    assert!(
        t.contains("golden image `debian-13-built` is not in the cache")
            && t.contains("sudo boma-qvm image build"),
        "{t}"
    );
    assert!(
        std::fs::read_dir(cache.join("images"))
            .unwrap()
            .next()
            .is_none(),
        "nothing written to the shared cache"
    );
    assert!(!user.state().join("vms/boma-it-askari").exists(), "no VM");
    assert!(!user.home().join("integration-runs").exists(), "no run dir");
    netd.stop();
}

/// Right after the set-up added an operator to group boma-qvm, their shell does not carry the
/// group yet: netd's socket refuses them, and they are told that, with `newgrp`, not to join a
/// group they are already in.
#[test]
fn a_session_older_than_the_group_membership_is_told_to_log_in_again() {
    let ns = Netns::new("ng");
    let mut netd = Netd::start(&ns, &[]);
    let user = TestUser::new();
    let o = std::process::Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--clear-groups")
        .args(["--", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
        .arg(format!("HOME={}", user.home().display()))
        .arg(format!("BOMA_QVM_NETD_SOCKET={}", netd.socket_env()))
        .arg(env!("CARGO_BIN_EXE_boma-qvm"))
        .args(["net", "status"])
        .current_dir(user.dir.path())
        .output()
        .unwrap();
    let t = out(&o);
    assert_eq!(o.status.code(), Some(11), "{t}");
    assert!(
        t.contains("Permission denied") && t.contains("newgrp boma-qvm"),
        "{t}"
    );
    assert!(!t.contains("usermod"), "{t}");
    netd.stop();
}
