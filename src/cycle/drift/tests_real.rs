//! The collection's parsing, normalisation and diff on outputs captured on real cycles of the
//! bundled example (testdata/): the red run (before and after the reboot), the same VM with the
//! fix's drop-in (green, before and after), and after a reboot that locked SSH out (read through
//! the guest agent), plus that boot's serial console.

use super::*;

fn state(raw: &str, when: &str, source: Source) -> GuestState {
    GuestState::from_script_output(when, source, raw)
}

fn red() -> (GuestState, GuestState) {
    (
        state(
            include_str!("testdata/red-before.txt"),
            "before reboot",
            Source::Ssh,
        ),
        state(
            include_str!("testdata/red-after.txt"),
            "after reboot",
            Source::Ssh,
        ),
    )
}

fn green() -> (GuestState, GuestState) {
    (
        state(
            include_str!("testdata/green-before.txt"),
            "before reboot",
            Source::Ssh,
        ),
        state(
            include_str!("testdata/green-after.txt"),
            "after reboot",
            Source::Ssh,
        ),
    )
}

#[test]
fn every_part_of_a_real_snapshot_is_read_and_normalised() {
    let (_, after) = red();
    assert_eq!(after.system.as_deref(), Some("running"));
    for part in Part::ALL {
        let s = after.section(part).unwrap();
        assert_eq!(s.source, Source::Ssh, "{part:?}: {s:?}");
        if part != Part::UnitsFailed {
            assert!(!s.lines.is_empty(), "{part:?} is empty");
        }
    }
    let nft = after.lines(Part::Nft);
    assert!(
        nft.contains(
            &"ip nat chain DOCKER: iifname != \"docker0\" tcp dport 8080 counter dnat to 172.17.0.2:80"
                .to_string()
        ),
        "{nft:#?}"
    );
    assert!(
        nft.iter()
            .all(|l| !l.contains("packets") && !l.contains("handle"))
    );
    assert!(
        !nft.iter().any(|l| l.contains("Warning")),
        "comments dropped"
    );
    let tables: Vec<&String> = nft.iter().filter(|l| l.starts_with("table ")).collect();
    assert_eq!(
        tables,
        ["table inet filter", "table ip filter", "table ip nat"]
    );
    assert_eq!(
        after.lines(Part::Listen),
        [
            "tcp 0.0.0.0:22 sshd",
            "tcp 0.0.0.0:5355 systemd-resolve",
            "tcp 0.0.0.0:8080 docker-proxy",
            "tcp 127.0.0.1:33073 busybox",
            "tcp 127.0.0.1:38805 containerd",
            "tcp 127.0.0.53%lo:53 systemd-resolve",
            "tcp 127.0.0.54:53 systemd-resolve",
            "tcp [::]:22 sshd",
            "tcp [::]:5355 systemd-resolve",
            "tcp [::]:8080 docker-proxy",
            "udp 0.0.0.0:5355 systemd-resolve",
            "udp 127.0.0.53%lo:53 systemd-resolve",
            "udp 127.0.0.54:53 systemd-resolve",
            "udp 192.168.231.181%enp0s4:68 systemd-network",
            "udp [::]:5355 systemd-resolve",
        ]
    );
    assert_eq!(
        after.lines(Part::Docker),
        ["edge boma/edge:busybox running 0.0.0.0:8080->80/tcp, :::8080->80/tcp"]
    );
    let units = after.lines(Part::UnitsActive);
    for want in [
        "docker.service running",
        "nftables.service exited",
        "ssh.service running",
    ] {
        assert!(units.contains(&want.to_string()), "{want} in {units:#?}");
    }
    assert!(
        !units
            .iter()
            .any(|u| u.starts_with("session-") || u.starts_with("user@") || u.contains(".device")),
        "{units:#?}"
    );
    assert!(
        after.lines(Part::Routes).contains(
            &"172.17.0.0/16 dev docker0 proto kernel scope link src 172.17.0.1".to_string()
        )
    );
    assert!(
        after
            .lines(Part::Routes)
            .contains(&"fe80::/64 dev veth* proto kernel metric 256 pref medium".to_string())
    );
    assert!(
        after
            .lines(Part::Sysctl)
            .contains(&"net/ipv4/ip_forward = 1".to_string())
    );
    let mounts = after.lines(Part::Mounts);
    assert!(
        mounts.contains(&"/ ext4 /dev/vda rw".to_string()),
        "{mounts:#?}"
    );
    assert!(
        !mounts.iter().any(|m| m.starts_with("/proc")
            || m.starts_with("/run/credentials")
            || m.starts_with("/sys")),
        "{mounts:#?}"
    );
}

#[test]
fn the_same_state_twice_is_no_change() {
    let (_, after) = red();
    let d = diff(&after, &after);
    assert!(d.is_empty(), "{}", d.render(100));
    // A reboot's noise does not count either: the first boot's one-shot units, containerd's
    // private port, a container's new veth name, pids.
    let (before, after) = green();
    let d = diff(&before, &after);
    for part in [
        Part::Listen,
        Part::UnitsActive,
        Part::UnitsFailed,
        Part::Routes,
        Part::Docker,
        Part::Mounts,
    ] {
        let s = d.sections.iter().find(|s| s.part == part).unwrap();
        assert!(!s.changed(), "{part:?} changed: {s:#?}");
    }
}

#[test]
fn the_red_diff_names_dockers_dnat_back_under_the_forward_drop() {
    let (before, after) = red();
    let d = diff(&before, &after);
    let f = d
        .finding("dnat-forward-drop")
        .unwrap_or_else(|| panic!("{}", d.render(100)));
    assert!(f.breaks);
    for want in [
        "tcp/8080",
        "172.17.0.2:80",
        "docker0",
        "came back",
        "`inet filter`",
        "policy drop",
    ] {
        assert!(f.text.contains(want), "{want}: {}", f.text);
    }
    assert!(
        !f.text.contains("`ip filter`"),
        "Docker's own chain accepts it: {}",
        f.text
    );
    assert!(
        d.finding("dnat-forward-accepted").is_none(),
        "{}",
        d.render(100)
    );
    let nft = d.sections.iter().find(|s| s.part == Part::Nft).unwrap();
    assert!(nft.removed.is_empty(), "{nft:#?}");
    for want in ["table ip nat", "table ip filter"] {
        assert!(nft.added.contains(&want.to_string()), "{want}: {nft:#?}");
    }
    let text = d.render(12);
    assert!(
        text.starts_with("what changed from before reboot to after reboot"),
        "{text}"
    );
    assert!(
        text.contains("!! DNAT of tcp/8080 to 172.17.0.2:80 (out of docker0) came back"),
        "{text}"
    );
    assert!(
        text.contains("+table ip nat (chains: DOCKER, OUTPUT [output hook, policy accept]")
            && text.contains(
                "among them `iifname != \"docker0\" tcp dport 8080 counter dnat to 172.17.0.2:80`"
            ),
        "a new table is one line when capped: {text}"
    );
    assert!(
        text.contains("FORWARD [forward hook, policy drop]"),
        "{text}"
    );
    let full = d.render(usize::MAX);
    for l in &nft.added {
        assert!(full.contains(&format!("+{l}\n")), "{l} in the full diff");
    }
}

#[test]
fn the_green_diff_shows_the_forward_accept_instead() {
    let (before, after) = green();
    let d = diff(&before, &after);
    assert!(
        d.finding("dnat-forward-drop").is_none(),
        "{}",
        d.render(100)
    );
    let f = d
        .finding("dnat-forward-accepted")
        .unwrap_or_else(|| panic!("{}", d.render(100)));
    assert!(!f.breaks);
    assert!(
        f.text
            .contains("`inet filter` (`oifname \"docker0\" accept`)"),
        "{}",
        f.text
    );
    assert!(
        f.text.contains(
            "`ip filter` (`oifname \"docker0\" counter jump DOCKER -> ip daddr 172.17.0.2"
        ),
        "Docker's own chain, through its jump: {}",
        f.text
    );
    assert!(d.findings.iter().all(|f| !f.breaks), "{}", d.render(100));
}

#[test]
fn a_lockout_read_through_the_agent_names_the_rule_that_drops_ssh() {
    let (before, _) = green();
    let raw = include_str!("testdata/lockout-after-agent.txt");
    let after = state(raw, "after reboot", Source::Agent);
    assert!(after.sections.iter().all(|s| s.source == Source::Agent));
    assert_eq!(after.sources(), "guest agent");
    let d = diff(&before, &after);
    let nft = d.sections.iter().find(|s| s.part == Part::Nft).unwrap();
    assert_eq!(
        (nft.source_before, nft.source_after),
        (Source::Ssh, Source::Agent)
    );
    assert!(
        nft.added
            .contains(&"inet filter chain input: tcp dport 22 drop".to_string()),
        "{nft:#?}"
    );
    let units = d
        .sections
        .iter()
        .find(|s| s.part == Part::UnitsActive)
        .unwrap();
    assert_eq!(units.added, ["boma-lockout.service exited"], "{units:#?}");
    assert!(units.removed.is_empty(), "{units:#?}");
    assert!(
        d.render(100)
            .contains("nft ruleset (from ssh -> guest agent)")
    );
}

#[test]
fn without_ssh_and_agent_the_console_of_the_last_boot_is_read() {
    let text = include_str!("testdata/console-lockout-boot.log");
    let after = console::state_from_console(
        "after reboot",
        text,
        "ssh: timed out; guest agent: no answer",
    );
    let units = after.lines(Part::UnitsActive);
    for want in [
        "boma-lockout.service",
        "nftables.service",
        "ssh.service",
        "qemu-guest-agent.service",
    ] {
        assert!(units.contains(&want.to_string()), "{want}: {units:#?}");
    }
    assert!(units.iter().all(|u| !u.contains('…')), "{units:#?}");
    assert_eq!(
        after.lines(Part::Routes),
        [
            "192.168.231.0/24 dev enp0s4",
            "192.168.231.1 dev enp0s4",
            "default via 192.168.231.1 dev enp0s4"
        ]
    );
    assert_eq!(after.section(Part::Nft).unwrap().source, Source::None);
    // Compared with a full snapshot, only what the console can show is compared.
    let (before, _) = green();
    let d = diff(&before, &after);
    let routes = d.sections.iter().find(|s| s.part == Part::Routes).unwrap();
    assert_eq!(routes.source_after, Source::Console);
    assert_eq!(
        routes.removed,
        ["172.17.0.0/16 dev docker0"],
        "docker0's route comes after cloud-init printed its table: {routes:#?}"
    );
    assert!(routes.note.as_deref().unwrap().contains("serial console"));
    let nft = d.sections.iter().find(|s| s.part == Part::Nft).unwrap();
    assert!(
        nft.note.as_deref().unwrap().starts_with("not compared"),
        "{nft:#?}"
    );
}

#[test]
fn the_lockout_boots_console_says_when_the_boot_was_done() {
    let text = include_str!("testdata/console-lockout-boot.log");
    let signals: Vec<String> = text
        .split('\n')
        .filter_map(|l| crate::machine::console::boot_done_signal(l.trim_end_matches('\r')))
        .map(String::from)
        .collect();
    assert_eq!(
        signals,
        ["getty login prompt", "cloud-init final stage finished"],
        "the prompt comes first, cloud-init's final stage after Docker"
    );
}
