//! The diff of two snapshots ("what the reboot changed"): per part, the lines that went and the
//! lines that came, and findings — the changes that matter named in one sentence each, e.g.
//! Docker's DNAT rules back under a forward chain whose policy drops them.

use super::{GuestState, Part, Source};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SectionDiff {
    pub part: Part,
    pub title: String,
    pub source_before: Source,
    pub source_after: Source,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<String>,
    /// Why the comparison is partial or impossible (a part not read, different sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl SectionDiff {
    pub fn changed(&self) -> bool {
        !self.removed.is_empty() || !self.added.is_empty()
    }
}

/// A change that matters, in one sentence. `breaks`: it breaks something (a published port, a
/// listener, a unit); otherwise it is a note (e.g. DNAT back and accepted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// A stable name for tests and tools: `dnat-forward-drop`, `dnat-forward-accepted`,
    /// `listener-gone`, `unit-failed`, `container-down`, `sysctl-changed`.
    pub kind: String,
    pub breaks: bool,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateDiff {
    /// "before reboot" (the post-apply snapshot).
    pub before: String,
    /// "after reboot", "now".
    pub after: String,
    pub boot_changed: Option<bool>,
    pub findings: Vec<Finding>,
    /// How a side was read when not over SSH, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub sections: Vec<SectionDiff>,
}

impl StateDiff {
    /// No part changed.
    pub fn is_empty(&self) -> bool {
        !self.sections.iter().any(SectionDiff::changed)
    }

    pub fn finding(&self, kind: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.kind == kind)
    }

    /// The diff as text: findings first, then each changed part's `-`/`+` lines (at most
    /// `max_lines` per part; the run directory's file has all of them).
    pub fn render(&self, max_lines: usize) -> String {
        let mut s = format!("what changed from {} to {}", self.before, self.after);
        match self.boot_changed {
            Some(true) => s.push_str(" (a new boot)"),
            Some(false) => s.push_str(" (the same boot)"),
            None => {}
        }
        s.push_str(":\n");
        for f in &self.findings {
            s.push_str(&format!(
                "  {} {}\n",
                if f.breaks { "!!" } else { "ok" },
                f.text
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("  note: {n}\n"));
        }
        if self.is_empty() {
            s.push_str("  nothing in the compared parts changed\n");
        }
        for d in &self.sections {
            if let (Some(n), false) = (&d.note, d.changed())
                && n.starts_with("not compared")
            {
                s.push_str(&format!("  {}: {n}\n", d.title));
                continue;
            }
            let from = if d.source_before == d.source_after {
                d.source_after.as_str().to_string()
            } else {
                format!(
                    "{} -> {}",
                    d.source_before.as_str(),
                    d.source_after.as_str()
                )
            };
            if !d.changed() && d.note.is_none() {
                continue;
            }
            s.push_str(&format!(
                "  {} (from {from}): -{} +{}\n",
                d.title,
                d.removed.len(),
                d.added.len()
            ));
            if let Some(n) = &d.note {
                s.push_str(&format!("      note: {n}\n"));
            }
            // Capped: a table that came or went as a whole is one line.
            let (removed, added) = if d.part == Part::Nft && max_lines != usize::MAX {
                (compact_tables(&d.removed), compact_tables(&d.added))
            } else {
                (d.removed.clone(), d.added.clone())
            };
            let lines = removed
                .iter()
                .map(|l| format!("-{l}"))
                .chain(added.iter().map(|l| format!("+{l}")));
            let total = removed.len() + added.len();
            for l in lines.take(max_lines) {
                s.push_str(&format!("      {l}\n"));
            }
            if total > max_lines {
                s.push_str(&format!(
                    "      ... {} more lines (reboot-diff.txt in the run directory)\n",
                    total - max_lines
                ));
            }
        }
        s
    }
}

/// nft lines with every table that is whole among them (its `table F N` line and all of its
/// chains) folded into one line: `table ip nat (chains DOCKER, PREROUTING; 7 rules, among them
/// `... dnat to 172.17.0.2:80`)`.
fn compact_tables(lines: &[String]) -> Vec<String> {
    let whole: Vec<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("table ").map(|t| format!("{t} ")))
        .collect();
    let mut out = Vec::new();
    for l in lines {
        if let Some(t) = l.strip_prefix("table ") {
            let prefix = format!("{t} ");
            let inner: Vec<&String> = lines.iter().filter(|x| x.starts_with(&prefix)).collect();
            let chains: Vec<String> = inner
                .iter()
                .filter(|x| !x.contains(": "))
                .map(|block| {
                    let name = block.strip_prefix(&prefix).unwrap_or(block);
                    let name = name.strip_prefix("chain ").unwrap_or(name);
                    // A base chain says where it hooks in and its policy.
                    let head = inner.iter().find_map(|x| {
                        x.strip_prefix(&format!("{block}: "))
                            .filter(|r| r.contains(" hook "))
                    });
                    match head {
                        Some(h) => {
                            let w: Vec<&str> = h.split_whitespace().collect();
                            let hook = w
                                .iter()
                                .position(|x| *x == "hook")
                                .and_then(|i| w.get(i + 1))
                                .unwrap_or(&"?");
                            let policy = w
                                .iter()
                                .position(|x| *x == "policy")
                                .and_then(|i| w.get(i + 1))
                                .map(|p| format!(", policy {}", p.trim_end_matches(';')))
                                .unwrap_or_default();
                            format!("{name} [{hook} hook{policy}]")
                        }
                        None => name.to_string(),
                    }
                })
                .collect();
            let rules: Vec<&str> = inner
                .iter()
                .filter_map(|x| x.split_once(": ").map(|(_, r)| r))
                .filter(|r| !r.contains(" hook "))
                .collect();
            let mut s = format!(
                "{l} ({}: {}; {} rules",
                if chains.len() == 1 { "chain" } else { "chains" },
                chains.join(", "),
                rules.len()
            );
            let notable: Vec<&&str> = rules
                .iter()
                .filter(|r| r.contains("dnat") || r.contains("snat"))
                .collect();
            if !notable.is_empty() {
                let shown: Vec<String> = notable.iter().map(|r| format!("`{r}`")).collect();
                s.push_str(&format!(", among them {}", shown.join(", ")));
            }
            s.push(')');
            out.push(s);
        } else if !whole.iter().any(|w| l.starts_with(w.as_str())) {
            out.push(l.clone());
        }
    }
    out
}

/// Lines of `a` not matched in `b` and lines of `b` not matched in `a`, by longest common
/// subsequence (order matters inside nft chains; the other parts are sorted, so this is their
/// set difference).
fn line_diff(a: &[String], b: &[String]) -> (Vec<String>, Vec<String>) {
    let (n, m) = (a.len(), b.len());
    if n * m > 4_000_000 {
        let removed = a.iter().filter(|l| !b.contains(l)).cloned().collect();
        let added = b.iter().filter(|l| !a.contains(l)).cloned().collect();
        return (removed, added);
    }
    let mut t = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            t[i][j] = if a[i] == b[j] {
                t[i + 1][j + 1] + 1
            } else {
                t[i + 1][j].max(t[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    while i < n && j < m {
        if a[i] == b[j] {
            i += 1;
            j += 1;
        } else if t[i + 1][j] >= t[i][j + 1] {
            removed.push(a[i].clone());
            i += 1;
        } else {
            added.push(b[j].clone());
            j += 1;
        }
    }
    removed.extend(a[i..].iter().cloned());
    added.extend(b[j..].iter().cloned());
    (removed, added)
}

/// The diff of `before` and `after`.
pub fn diff(before: &GuestState, after: &GuestState) -> StateDiff {
    let mut sections = Vec::new();
    for part in Part::ALL {
        let (b, a) = (before.section(part), after.section(part));
        let sb = b.map_or(Source::None, |s| s.source);
        let sa = a.map_or(Source::None, |s| s.source);
        let mut d = SectionDiff {
            part,
            title: part.title().to_string(),
            source_before: sb,
            source_after: sa,
            removed: Vec::new(),
            added: Vec::new(),
            note: None,
        };
        if sb == Source::None || sa == Source::None {
            let why = [(before, b), (after, a)]
                .iter()
                .filter(|(_, s)| s.is_none_or(|s| !s.available()))
                .map(|(st, s)| {
                    format!(
                        "{}: {}",
                        st.when,
                        s.and_then(|s| s.note.clone())
                            .unwrap_or_else(|| "not read".into())
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            d.note = Some(format!("not compared ({why})"));
            sections.push(d);
            continue;
        }
        let console = sb == Source::Console || sa == Source::Console;
        let (mut removed, mut added) = if console {
            line_diff(
                &project(part, before.lines(part)),
                &project(part, after.lines(part)),
            )
        } else {
            line_diff(before.lines(part), after.lines(part))
        };
        if part == Part::Listen {
            same_daemon_new_port(&mut removed, &mut added);
        }
        d.removed = removed;
        d.added = added;
        if console {
            d.note = Some(
                "read from the serial console on one side: only what the boot printed there, \
                 so a `-` line may only mean the console did not show it"
                    .into(),
            );
        }
        sections.push(d);
    }
    let boot_changed = match (&before.boot_id, &after.boot_id) {
        (Some(b), Some(a)) => Some(b != a),
        _ => None,
    };
    let notes = [before, after]
        .iter()
        .filter_map(|st| {
            let why = st.fallback.as_deref()?;
            let has = |src| st.sections.iter().any(|s| s.source == src);
            let how = if has(Source::Agent) {
                "read through the guest agent"
            } else if has(Source::Console) {
                "read from the serial console, as far as it shows"
            } else {
                "not read at all"
            };
            Some(format!("{} was {how} ({why})", st.when))
        })
        .collect();
    let mut d = StateDiff {
        before: before.when.clone(),
        after: after.when.clone(),
        boot_changed,
        findings: Vec::new(),
        notes,
        sections,
    };
    d.findings = findings(before, after, &d);
    d
}

/// A daemon listening on a different ephemeral port after the reboot (containerd's private
/// API on 127.0.0.1:<random>) is the same listener: drop such pairs.
fn same_daemon_new_port(removed: &mut Vec<String>, added: &mut Vec<String>) {
    let split = |l: &str| -> Option<(String, u32)> {
        let w: Vec<&str> = l.split_whitespace().collect();
        let (host, port) = w.get(1)?.rsplit_once(':')?;
        let port: u32 = port.parse().ok()?;
        Some((format!("{} {host} {}", w[0], w.get(2).unwrap_or(&"")), port))
    };
    let mut i = 0;
    while i < removed.len() {
        let pair = split(&removed[i])
            .filter(|(_, p)| *p >= 32768)
            .and_then(|(k, _)| {
                added
                    .iter()
                    .position(|a| split(a).is_some_and(|(ka, pa)| ka == k && pa >= 32768))
            });
        match pair {
            Some(j) => {
                removed.remove(i);
                added.remove(j);
            }
            None => i += 1,
        }
    }
}

/// What the console can show of a part, for comparing a console-read side with a full one:
/// unit names (no sub-state), IPv4 routes as `DEST [via GW] dev IF`.
fn project(part: Part, lines: &[String]) -> Vec<String> {
    let mut v: Vec<String> = lines
        .iter()
        // cloud-init's table on the console holds IPv4 routes only.
        .filter(|l| {
            part != Part::Routes || !l.split_whitespace().next().unwrap_or("").contains(':')
        })
        .map(|l| match part {
            Part::UnitsActive | Part::UnitsFailed => {
                l.split_whitespace().next().unwrap_or("").to_string()
            }
            Part::Routes => {
                let w: Vec<&str> = l.split_whitespace().collect();
                let mut out = vec![w.first().copied().unwrap_or("")];
                for key in ["via", "dev"] {
                    if let Some(i) = w.iter().position(|x| *x == key) {
                        out.extend([key, w.get(i + 1).copied().unwrap_or("")]);
                    }
                }
                out.join(" ")
            }
            _ => l.clone(),
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// A DNAT rule: the published port and where it goes.
#[derive(Debug, Clone, PartialEq)]
struct Dnat {
    /// "tcp/8080" (or "any" when the rule names no port).
    port: String,
    /// "172.17.0.2:80"
    to: String,
    to_ip: String,
    /// The nft line it came from.
    rule: String,
}

/// DNAT rules in a normalised ruleset (`... tcp dport 8080 ... dnat to 172.17.0.2:80`, or
/// `dnat ip to ...`).
fn dnats(nft: &[String]) -> Vec<Dnat> {
    nft.iter()
        .filter_map(|l| {
            let (_, stmt) = l.split_once(": ")?;
            let w: Vec<&str> = stmt.split_whitespace().collect();
            let at = w.iter().position(|x| *x == "dnat")?;
            let mut k = at + 1;
            if matches!(w.get(k), Some(&"ip") | Some(&"ip6")) {
                k += 1;
            }
            if w.get(k) != Some(&"to") {
                return None;
            }
            let to = w.get(k + 1)?.trim_end_matches(',').to_string();
            let to_ip = match to.rsplit_once(':') {
                Some((ip, port)) if port.parse::<u16>().is_ok() && !ip.contains(':') => ip,
                _ => to.as_str(),
            }
            .to_string();
            let proto = w
                .iter()
                .position(|x| *x == "dport")
                .and_then(|i| i.checked_sub(1).map(|p| (w[p], w.get(i + 1))));
            let port = match proto {
                Some((p, Some(n))) => format!("{p}/{n}"),
                _ => "any".into(),
            };
            Some(Dnat {
                port,
                to,
                to_ip,
                rule: l.clone(),
            })
        })
        .collect()
}

/// The device the routes send `ip` out of (`172.17.0.0/16 dev docker0 ...`), longest prefix.
fn route_dev(routes: &[String], ip: &str) -> Option<String> {
    let ip: std::net::Ipv4Addr = ip.parse().ok()?;
    let mut best: Option<(u8, String)> = None;
    for r in routes {
        let w: Vec<&str> = r.split_whitespace().collect();
        let (Some(dest), Some(dev)) = (
            w.first(),
            w.iter()
                .position(|x| *x == "dev")
                .and_then(|i| w.get(i + 1)),
        ) else {
            continue;
        };
        let (net, len) = match dest.split_once('/') {
            Some((n, l)) => (n, l.parse::<u8>().ok()?),
            None if *dest == "default" => ("0.0.0.0", 0),
            None => (*dest, 32),
        };
        let Ok(net) = net.parse::<std::net::Ipv4Addr>() else {
            continue;
        };
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - len.min(32) as u32)
        };
        if u32::from(ip) & mask == u32::from(net) & mask && best.as_ref().is_none_or(|b| len > b.0)
        {
            best = Some((len, dev.to_string()));
        }
    }
    best.map(|b| b.1)
}

/// A base chain on the forward hook: its path (`inet filter chain forward`), whether its policy
/// drops, and its rules.
struct ForwardChain {
    path: String,
    drops: bool,
    rules: Vec<String>,
}

/// The rules of every chain, by path (`ip filter chain DOCKER`).
fn chains(nft: &[String]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for l in nft {
        let Some((path, stmt)) = l.split_once(": ") else {
            continue;
        };
        if !path.contains(" chain ") {
            continue;
        }
        match out.iter_mut().find(|(p, _)| p == path) {
            Some((_, r)) => r.push(stmt.to_string()),
            None => out.push((path.to_string(), vec![stmt.to_string()])),
        }
    }
    out
}

fn forward_chains(all: &[(String, Vec<String>)]) -> Vec<ForwardChain> {
    all.iter()
        .filter_map(|(path, rules)| {
            let head = rules.iter().find(|r| r.contains("hook forward"))?;
            Some(ForwardChain {
                path: path.clone(),
                drops: head.contains("policy drop"),
                rules: rules
                    .iter()
                    .filter(|r| !r.contains(" hook "))
                    .cloned()
                    .collect(),
            })
        })
        .collect()
}

/// Does `rule` let a new connection forwarded out of `dev` through, on its own (`accept`) or by
/// jumping to a chain of the same table that does? Returns the accepting rule.
fn accepting(
    rule: &str,
    dev: Option<&str>,
    table: &str,
    all: &[(String, Vec<String>)],
    depth: u8,
) -> Option<String> {
    if rule.contains("ct status dnat") && rule.ends_with("accept") {
        return Some(rule.to_string());
    }
    // Only established/related traffic: not a new connection's first packet.
    if rule.contains("ct state") && !rule.contains("new") {
        return None;
    }
    let w: Vec<&str> = rule.split_whitespace().collect();
    let positive = |key: &str| {
        w.windows(2)
            .find(|p| p[0] == key && p[1] != "!=")
            .map(|p| p[1].trim_matches('"'))
    };
    if positive("oifname").is_some_and(|o| Some(o) != dev) {
        return None;
    }
    if positive("iifname").is_some_and(|i| Some(i) == dev) {
        return None;
    }
    match w.last().copied() {
        Some("accept") => Some(rule.to_string()),
        _ if depth > 0 => {
            let at = w.iter().position(|x| *x == "jump" || *x == "goto")?;
            let target = format!("{table} chain {}", w.get(at + 1)?);
            let (_, rules) = all.iter().find(|(p, _)| *p == target)?;
            rules
                .iter()
                .find_map(|r| accepting(r, dev, table, all, depth - 1))
                .map(|r| format!("{rule} -> {r}"))
        }
        _ => None,
    }
}

fn findings(before: &GuestState, after: &GuestState, d: &StateDiff) -> Vec<Finding> {
    let mut out = Vec::new();
    let nft_read = |s: &GuestState| s.section(Part::Nft).is_some_and(|x| x.available());
    if nft_read(after) {
        let nft = after.lines(Part::Nft);
        let routes = after.lines(Part::Routes);
        let before_dnats: Vec<String> = dnats(before.lines(Part::Nft))
            .into_iter()
            .map(|x| x.rule)
            .collect();
        let all = chains(nft);
        let forward = forward_chains(&all);
        let mut seen = Vec::new();
        for x in dnats(nft) {
            let key = (x.port.clone(), x.to.clone());
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let dev = route_dev(routes, &x.to_ip);
            let back = if nft_read(before) && !before_dnats.contains(&x.rule) {
                "came back"
            } else {
                "is in place"
            };
            let via = dev
                .as_deref()
                .map(|d| format!(" (out of {d})"))
                .unwrap_or_default();
            let mut dropping = Vec::new();
            let mut accepted = Vec::new();
            for c in forward.iter().filter(|c| c.drops) {
                let table = c
                    .path
                    .split(" chain ")
                    .next()
                    .unwrap_or(&c.path)
                    .to_string();
                match c
                    .rules
                    .iter()
                    .find_map(|r| accepting(r, dev.as_deref(), &table, &all, 2))
                {
                    Some(rule) => accepted.push(format!("`{table}` (`{rule}`)")),
                    None => dropping.push(format!("`{table}`")),
                }
            }
            if !dropping.is_empty() {
                out.push(Finding {
                    kind: "dnat-forward-drop".into(),
                    breaks: true,
                    text: format!(
                        "DNAT of {} to {}{via} {back}, and the forward chain of {} drops it \
                         (policy drop, no accept for {}): the published port is dead from outside",
                        x.port,
                        x.to,
                        dropping.join(" and "),
                        dev.as_deref().unwrap_or("its interface"),
                    ),
                });
            } else if !accepted.is_empty() {
                out.push(Finding {
                    kind: "dnat-forward-accepted".into(),
                    breaks: false,
                    text: format!(
                        "DNAT of {} to {}{via} {back}; every forward chain with policy drop \
                         accepts it: {}",
                        x.port,
                        x.to,
                        accepted.join(", ")
                    ),
                });
            }
        }
    }
    for s in &d.sections {
        match s.part {
            Part::Listen => {
                for l in &s.removed {
                    let addr = l.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
                    if !s.added.iter().any(|a| a.starts_with(&format!("{addr} "))) {
                        out.push(Finding {
                            kind: "listener-gone".into(),
                            breaks: true,
                            text: format!("nothing listens on {addr} any more (was: {l})"),
                        });
                    }
                }
            }
            Part::UnitsFailed => {
                for l in &s.added {
                    out.push(Finding {
                        kind: "unit-failed".into(),
                        breaks: true,
                        text: format!("{l} failed"),
                    });
                }
            }
            Part::Docker => {
                for l in &s.added {
                    let mut w = l.split_whitespace();
                    let (name, state) = (w.next().unwrap_or(""), w.nth(1).unwrap_or(""));
                    if state != "running"
                        && s.removed
                            .iter()
                            .any(|r| r.starts_with(&format!("{name} ")) && r.contains(" running"))
                    {
                        out.push(Finding {
                            kind: "container-down".into(),
                            breaks: true,
                            text: format!("container {name} was running and is {state} now"),
                        });
                    }
                }
            }
            Part::Sysctl => {
                for l in &s.added {
                    let key = l.split(" = ").next().unwrap_or(l);
                    let was = s
                        .removed
                        .iter()
                        .find(|r| r.starts_with(&format!("{key} = ")))
                        .map(|r| r.split(" = ").nth(1).unwrap_or("?").to_string())
                        .unwrap_or_else(|| "unset".into());
                    out.push(Finding {
                        kind: "sysctl-changed".into(),
                        breaks: false,
                        text: format!("{key}: {was} -> {}", l.split(" = ").nth(1).unwrap_or("?")),
                    });
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn line_diff_keeps_order_and_finds_moves() {
        let (r, a) = line_diff(&v(&["a", "b", "c"]), &v(&["a", "c", "b", "d"]));
        assert_eq!(r, v(&["b"]));
        assert_eq!(a, v(&["b", "d"]));
        assert_eq!(line_diff(&v(&["x"]), &v(&["x"])), (vec![], vec![]));
    }

    #[test]
    fn routes_pick_the_longest_prefix() {
        let r = v(&[
            "default via 192.168.231.1 dev enp0s4 proto dhcp",
            "172.17.0.0/16 dev docker0 proto kernel scope link src 172.17.0.1",
        ]);
        assert_eq!(route_dev(&r, "172.17.0.2").as_deref(), Some("docker0"));
        assert_eq!(route_dev(&r, "8.8.8.8").as_deref(), Some("enp0s4"));
    }
}
