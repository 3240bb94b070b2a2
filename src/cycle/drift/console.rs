//! The last resort when neither SSH nor the guest agent answers: what the serial console of the
//! last boot shows. systemd reports the units it started or failed to start (until the login
//! prompt takes the console over), and cloud-init prints its route table at its network stage.
//! The ruleset, sockets, containers, sysctls and mounts are not on the console.

use super::{GuestState, Part, Section, Source};
use crate::machine::events::now;

/// The console output of the last boot (from the last `Linux version` line on), colour codes
/// and carriage returns removed.
pub fn last_boot(text: &str) -> String {
    let from = text
        .rfind("Linux version ")
        .map_or(0, |i| text[..i].rfind('\n').map_or(0, |n| n + 1));
    strip_ansi(&text[from..]).replace('\r', "")
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte; OSC: ESC ] ... BEL; others: ESC + one char.
            match chars.next() {
                Some('[') => {
                    for n in chars.by_ref() {
                        if ('@'..='~').contains(&n) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    for n in chars.by_ref() {
                        if n == '\u{7}' {
                            break;
                        }
                    }
                }
                _ => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `[  OK  ] Started ssh.service - OpenBSD ...` -> ("OK", "Started", "ssh.service").
fn status_line(l: &str) -> Option<(&str, &str, &str)> {
    let l = l.trim_start();
    let rest = l.strip_prefix('[')?;
    let (status, rest) = rest.split_once(']')?;
    let mut w = rest.split_whitespace();
    let verb = w.next()?;
    // "Failed to start X", "Started X", "Finished X", "Listening on X", "Reached target X"
    let unit = match verb {
        "Failed" => w.nth(2)?,
        "Listening" | "Reached" => w.nth(1)?,
        _ => w.next()?,
    };
    // systemd shortens long names with an ellipsis: such a name is not one.
    (unit.contains('.') && !unit.contains('…')).then_some((status.trim(), verb, unit))
}

/// Routes from cloud-init's `ci-info` tables (IPv4: destination, gateway, genmask, interface),
/// as `DEST[/LEN] [via GW] dev IF`.
fn ci_routes(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut v4 = false;
    for l in text.lines() {
        let Some(i) = l.find("ci-info: ") else {
            continue;
        };
        let row = &l[i + 9..];
        if row.contains("Route IPv4 info") {
            v4 = true;
            continue;
        }
        if row.contains("Route IPv6 info") || row.contains("Net device info") {
            v4 = false;
            continue;
        }
        if !v4 || !row.starts_with('|') {
            continue;
        }
        let f: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        if f.len() < 6 || f[0] == "Route" {
            continue;
        }
        let (dest, gw, mask, dev) = (f[1], f[2], f[3], f[4]);
        let Ok(mask) = mask.parse::<std::net::Ipv4Addr>() else {
            continue;
        };
        let len = u32::from(mask).count_ones();
        let mut r = match (dest, len) {
            ("0.0.0.0", 0) => "default".to_string(),
            (d, 32) => d.to_string(),
            (d, n) => format!("{d}/{n}"),
        };
        if gw != "0.0.0.0" {
            r.push_str(&format!(" via {gw}"));
        }
        r.push_str(&format!(" dev {dev}"));
        out.push(r);
    }
    out.sort();
    out.dedup();
    out
}

/// What the console of the last boot says, as a snapshot (`why`: why SSH and the agent failed).
pub fn state_from_console(when: &str, text: &str, why: &str) -> GuestState {
    let boot = last_boot(text);
    let mut failed = Vec::new();
    let mut active = Vec::new();
    for l in boot.lines() {
        match status_line(l) {
            Some(("FAILED", "Failed", u)) => failed.push(u.to_string()),
            Some(("OK", "Started" | "Finished" | "Listening" | "Reached", u)) => {
                active.push(u.to_string())
            }
            _ => {}
        }
    }
    failed.sort();
    failed.dedup();
    active.sort();
    active.dedup();
    active.retain(|u| !failed.contains(u));
    let routes = ci_routes(&boot);
    let from_console = |part, lines: Vec<String>, what: &str| Section {
        part,
        source: Source::Console,
        lines,
        note: Some(what.to_string()),
    };
    let sections = Part::ALL
        .into_iter()
        .map(|part| match part {
            Part::UnitsFailed => from_console(
                part,
                failed.clone(),
                "the units systemd reported failing on the console during boot",
            ),
            Part::UnitsActive => from_console(
                part,
                active.clone(),
                "the units systemd reported starting on the console during boot (up to the \
                 login prompt)",
            ),
            Part::Routes if !routes.is_empty() => from_console(
                part,
                routes.clone(),
                "the IPv4 routes cloud-init printed at its network stage (before later \
                 services such as Docker added theirs)",
            ),
            _ => Section {
                part,
                source: Source::None,
                lines: Vec::new(),
                note: Some("not on the serial console".into()),
            },
        })
        .collect();
    GuestState {
        when: when.to_string(),
        taken: now(),
        boot_id: None,
        system: None,
        fallback: Some(why.to_string()),
        sections,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOTS: &str = "[    0.000000] Linux version 6.12 old boot\n\
        [\u{1b}[0;1;31mFAILED\u{1b}[0m] Failed to start \u{1b}[0;1;39mold.service\u{1b}[0m - Old.\r\n\
        [    0.000000] Linux version 6.12.117+deb13-cloud-amd64 (debian-kernel@lists.debian.org)\r\n\
        [\u{1b}[0;32m  OK  \u{1b}[0m] Started \u{1b}[0;1;39mssh.service\u{1b}[0m - OpenBSD Secure Shell server.\r\r\n\
        [\u{1b}[0;32m  OK  \u{1b}[0m] Finished \u{1b}[0;1;39mnftables.service\u{1b}[0m - nftables.\r\r\n\
        [\u{1b}[0;32m  OK  \u{1b}[0m] Listening on \u{1b}[0;1;39mdocker.socket\u{1b}[0m - Docker Socket for the API.\r\r\n\
        [\u{1b}[0;1;31mFAILED\u{1b}[0m] Failed to start \u{1b}[0;1;39mboma-x.service\u{1b}[0m - X.\r\r\n\
        [   88.27] cloud-init[555]: ci-info: ++++++++++++++++Route IPv4 info+++++++++++++++\r\n\
        [   88.27] cloud-init[555]: ci-info: | Route |  Destination  |    Gateway    |     Genmask     | Interface | Flags |\r\n\
        [   88.27] cloud-init[555]: ci-info: |   0   |    0.0.0.0    | 192.168.231.1 |     0.0.0.0     |   enp0s4  |   UG  |\r\n\
        [   88.27] cloud-init[555]: ci-info: |   1   | 192.168.231.0 |    0.0.0.0    |  255.255.255.0  |   enp0s4  |   U   |\r\n\
        [   88.27] cloud-init[555]: ci-info: |   2   | 192.168.231.1 |    0.0.0.0    | 255.255.255.255 |   enp0s4  |   UH  |\r\n\
        [   88.29] cloud-init[555]: ci-info: +++++++++++++++++++Route IPv6 info+++++++++++++++++++\r\n\
        [   88.30] cloud-init[555]: ci-info: |   0   |  fe80::/64  |    ::   |   enp0s4  |   U   |\r\n";

    #[test]
    fn the_last_boot_gives_units_and_routes() {
        let s = state_from_console("after reboot", BOOTS, "ssh: refused; guest agent: silent");
        assert_eq!(s.lines(Part::UnitsFailed), ["boma-x.service"]);
        assert_eq!(
            s.lines(Part::UnitsActive),
            ["docker.socket", "nftables.service", "ssh.service"]
        );
        assert_eq!(
            s.lines(Part::Routes),
            [
                "192.168.231.0/24 dev enp0s4",
                "192.168.231.1 dev enp0s4",
                "default via 192.168.231.1 dev enp0s4"
            ]
        );
        let nft = s.section(Part::Nft).unwrap();
        assert_eq!(nft.source, Source::None);
        assert_eq!(nft.note.as_deref(), Some("not on the serial console"));
        assert_eq!(
            s.fallback.as_deref(),
            Some("ssh: refused; guest agent: silent")
        );
        assert_eq!(s.section(Part::Routes).unwrap().source, Source::Console);
    }
}
