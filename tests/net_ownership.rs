//! boma-qvm touches only what it created (issue 12 part 4, sweep rows B3-B5 and `--bridge lo`):
//! a bridge it did not make is never adopted, changed or deleted; a refused command saves no
//! configuration; `down` and `prune` remove only what this state recorded; a second state dir in
//! the same network namespace is refused clearly and its `prune` never cuts off the first one's
//! VM. Every case runs the real CLI in a network namespace of its own.

mod common;

use common::netns::Netns;
use common::{Env, Run, test_guest, text};

/// `ip -n NS -4 -o addr show dev DEV`, or "" when the link is gone.
fn addrs(ns: &Netns, dev: &str) -> String {
    String::from_utf8_lossy(&ns.exec(&format!("ip -4 -o addr show dev {dev}")).stdout).into_owned()
}

fn link_exists(ns: &Netns, dev: &str) -> bool {
    ns.exec(&format!("ip link show dev {dev}")).status.success()
}

/// The network is refused with exit 11, a message naming the bridge, and a fix.
fn refused(o: &std::process::Output, needle: &str) {
    let t = text(o);
    eprintln!("user sees: {t}");
    assert_eq!(o.status.code(), Some(11), "{t}");
    assert!(t.contains(needle) && t.contains("fix:"), "{t}");
}

/// The busybox test guest with a NIC, as `up` takes it.
fn guest_with_net(host: &str) -> Vec<String> {
    let (k, i) = test_guest();
    common::guest_up_args(host, &k, &i, "console=ttyS0 boma.net=1")
}

/// B3 + B4: a foreign bridge with an address. `net up` and `up` refuse it; the refusal saves
/// nothing, so neither `net down` nor `prune` (the fix the old error suggested) touch it.
#[test]
fn a_foreign_bridge_with_an_address_is_refused_and_survives_down_and_prune() {
    let env = Env::new();
    let ns = Netns::new("b3");
    ns.ip("link add realbr0 type bridge");
    ns.ip("addr add 10.99.0.1/24 dev realbr0");
    ns.ip("link set realbr0 up");

    let o = env.cli_in(&ns).run(&["net", "up", "--bridge", "realbr0"]);
    refused(&o, "bridge realbr0 exists and boma-qvm did not create it");
    assert!(
        !env.dirs.net().join("config.json").exists(),
        "a refused command saved its configuration"
    );
    let mut up = guest_with_net("b3");
    up.extend(["--bridge".into(), "realbr0".into()]);
    let args: Vec<&str> = up.iter().map(String::as_str).collect();
    let o = env.cli_in(&ns).run(&args);
    refused(&o, "bridge realbr0 exists and boma-qvm did not create it");
    assert!(
        !env.dirs.vm("boma-it-b3").exists(),
        "refused before a VM was made"
    );

    let status = env.cli_in(&ns).ok(&["net", "status"]);
    assert!(!status.contains("realbr0"), "{status}");
    env.cli_in(&ns).ok(&["net", "down"]);
    let pruned = env.cli_in(&ns).ok(&["prune"]);
    assert!(!pruned.contains("removed bridge"), "{pruned}");
    assert!(
        addrs(&ns, "realbr0").contains("10.99.0.1/24"),
        "the foreign bridge was changed or deleted"
    );
    let left = ns.leftovers(&env.dirs.state);
    assert!(left.is_empty(), "left behind:\n{left}");
}

/// B5: a foreign bridge without an address is not adopted (no address, no DHCP on it) and
/// `net down` leaves it.
#[test]
fn a_foreign_bridge_without_an_address_is_not_adopted() {
    let env = Env::new();
    let ns = Netns::new("b5");
    ns.ip("link add l2br0 type bridge");
    ns.ip("link set l2br0 up");
    let o = env.cli_in(&ns).run(&["net", "up", "--bridge", "l2br0"]);
    refused(&o, "bridge l2br0 exists and boma-qvm did not create it");
    assert_eq!(addrs(&ns, "l2br0"), "", "an address was put on it");
    env.cli_in(&ns).ok(&["net", "down"]);
    assert!(
        link_exists(&ns, "l2br0"),
        "net down deleted the foreign bridge"
    );
    let left = ns.leftovers(&env.dirs.state);
    assert!(left.is_empty(), "left behind (dnsmasq on it?):\n{left}");
}

/// `--bridge lo`: refused, and nothing of it is saved (`net status` does not show `lo`).
#[test]
fn bridge_lo_is_refused_and_not_saved() {
    let env = Env::new();
    let ns = Netns::new("lo");
    let o = env.cli_in(&ns).run(&["net", "up", "--bridge", "lo"]);
    refused(&o, "interface lo exists and is not a bridge");
    let status = env.cli_in(&ns).ok(&["net", "status"]);
    assert!(
        status.contains("bridge   boma-qvm0: absent") && !status.contains(" lo"),
        "{status}"
    );
    env.cli_in(&ns).ok(&["net", "down"]);
    assert!(
        ns.exec_ok("ip -o link show lo").contains("UP"),
        "lo was touched"
    );
}

/// prune is not host-wide: a bridge named like ours and a tap with our prefix that this state
/// never made are left alone, also the one its saved config names (made by someone else after
/// our `net down`), and prune says why.
#[test]
fn prune_leaves_look_alikes_it_did_not_make() {
    let env = Env::new();
    let ns = Netns::new("look");
    env.cli_in(&ns).ok(&["net", "up"]);
    env.cli_in(&ns).ok(&["net", "down"]);
    ns.ip("link add boma-qvm7 type bridge");
    ns.ip("tuntap add dev bq-foreign mode tap");
    ns.ip("link add boma-qvm0 type bridge");
    let pruned = env.cli_in(&ns).ok(&["prune"]);
    assert!(
        !pruned.contains("removed bridge") && !pruned.contains("removed tap"),
        "{pruned}"
    );
    assert!(
        pruned.contains("left alone: bridge boma-qvm0: this state did not create it"),
        "{pruned}"
    );
    for dev in ["boma-qvm7", "bq-foreign", "boma-qvm0"] {
        assert!(link_exists(&ns, dev), "prune deleted {dev}:\n{pruned}");
    }
}

/// Two state dirs in one network namespace: the second one's network is refused clearly (naming
/// the first state), whatever bridge it asks for, and nothing of it is made; its `prune` and
/// `net down` leave the first one's network and running VM alone.
#[test]
fn a_second_state_is_refused_and_cannot_cut_off_the_first_ones_vm() {
    let a = Env::new();
    let b = Env::new();
    let ns = Netns::new("two");
    let up = guest_with_net("first");
    let args: Vec<&str> = up.iter().map(String::as_str).collect();
    a.cli_in(&ns).ok(&args);
    let status = a.cli_in(&ns).ok(&["status", "first"]);
    let ip = status
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ip="))
        .unwrap_or_else(|| panic!("no ip in {status}"))
        .to_string();
    let reach = |what: &str| {
        let out = ns.exec(&format!(
            "echo 'echo $((6*7))' | timeout 10 busybox nc {ip} 7000"
        ));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "42",
            "the first state's VM is cut off {what}"
        );
    };
    reach("from the start");

    let o = b.cli_in(&ns).run(&["net", "up"]);
    refused(
        &o,
        "bridge boma-qvm0 is the network of another boma-qvm state",
    );
    assert!(
        text(&o).contains(&format!("BOMA_QVM_STATE_DIR={}", a.dirs.state.display())),
        "the fix names the state that owns it: {}",
        text(&o)
    );
    let o = b.cli_in(&ns).run(&[
        "net",
        "up",
        "--bridge",
        "boma-qvm1",
        "--subnet",
        "192.168.232.0/24",
    ]);
    refused(
        &o,
        "nft table inet boma_qvm is loaded by another boma-qvm network",
    );
    assert!(
        !link_exists(&ns, "boma-qvm1"),
        "the refused network made its bridge"
    );

    b.cli_in(&ns).ok(&["prune"]);
    b.cli_in(&ns).ok(&["net", "down"]);
    reach("after the second state's prune and net down");
    let st = a.cli_in(&ns).ok(&["net", "status"]);
    assert!(
        st.contains("dnsmasq  running") && st.contains("table inet boma_qvm: loaded"),
        "{st}"
    );

    a.cli_in(&ns).ok(&["down", "first"]);
    for s in [&a, &b] {
        let left = ns.leftovers(&s.dirs.state);
        assert!(left.is_empty(), "left behind:\n{left}");
    }
}

/// Root with a private state dir keeps dnsmasq's re-read files in a directory of its own under
/// /run: a directory or a symlink already at that path, which this state did not make, is
/// refused before anything is built, and `net down` and `prune` leave it (and what it holds).
#[test]
fn a_dnsmasq_directory_this_state_did_not_make_is_not_adopted() {
    use std::os::unix::fs::PermissionsExt;
    let ns = Netns::new("rd");
    let elsewhere = tempfile::tempdir().unwrap();
    for symlink in [false, true] {
        // Env's drop removes whatever is at its /run path, so nothing outlives the test.
        let env = Env::new();
        std::fs::set_permissions(env.tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let public = boma_qvm::net::files::NetFiles::new(&env.dirs).public_dir();
        if symlink {
            std::os::unix::fs::symlink(elsewhere.path(), &public).unwrap();
        } else {
            std::fs::create_dir(&public).unwrap();
        }
        std::fs::write(public.join("theirs"), "keep").unwrap();

        let o = env.cli_in(&ns).run(&["net", "up"]);
        refused(&o, &format!("{} exists and is", public.display()));
        assert!(!link_exists(&ns, "boma-qvm0"), "built despite the refusal");
        assert!(
            !env.dirs.net().join("config.json").exists(),
            "a refused command saved its configuration"
        );
        env.cli_in(&ns).ok(&["net", "down"]);
        env.cli_in(&ns).ok(&["prune"]);
        let m = std::fs::symlink_metadata(&public).expect("it survives");
        assert_eq!(m.file_type().is_symlink(), symlink);
        assert_eq!(
            std::fs::read_to_string(public.join("theirs")).unwrap(),
            "keep"
        );
        let left = ns.leftovers(&env.dirs.state);
        assert!(left.is_empty(), "left behind:\n{left}");
    }
}
