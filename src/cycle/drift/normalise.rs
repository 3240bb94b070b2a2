//! Normalisation: each part's raw output becomes lines that are equal when the state is equal.
//! Volatile details (counters, handles, pids, ages, expiry timers, per-session units) go; order is
//! made stable where it carries no meaning (tables, chains, sockets, units, routes, mounts) and
//! kept where it does (the rules inside a chain).

use super::Part;

pub fn normalise(part: Part, raw: &str) -> Vec<String> {
    match part {
        Part::Nft => nft(raw),
        Part::Listen => listen(raw),
        Part::UnitsFailed => units(raw, true),
        Part::UnitsActive => units(raw, false),
        Part::Docker => docker(raw),
        Part::Routes => routes(raw),
        Part::Sysctl => sorted(raw.lines().map(squash).filter(|l| !l.is_empty())),
        Part::Mounts => mounts(raw),
    }
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn sorted(it: impl Iterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = it.collect();
    v.sort();
    v.dedup();
    v
}

/// Drop `word N` pairs (e.g. `packets 12`) and `# handle N` comments from an nft statement.
fn nft_statement(s: &str) -> String {
    let s = match s.find(" # handle ") {
        Some(i) => &s[..i],
        None => s,
    };
    let mut out: Vec<&str> = Vec::new();
    let mut words = s.split_whitespace().peekable();
    while let Some(w) = words.next() {
        match w {
            // Counter and quota values, timeouts counting down: state, not configuration.
            "packets" | "bytes" | "expires" | "used" => {
                words.next();
            }
            _ => out.push(w),
        }
    }
    out.join(" ")
}

/// A block of the ruleset: `table ip nat`, `chain DOCKER`, `set x`, with its statements in order
/// and its child blocks.
#[derive(Debug, Default)]
struct Block {
    head: String,
    statements: Vec<String>,
    children: Vec<Block>,
}

/// `nft -s list ruleset` as lines `table FAMILY NAME`, `FAMILY NAME chain C` and
/// `FAMILY NAME chain C: STATEMENT` (likewise for sets, maps, flowtables...). Tables sorted by
/// family and name, blocks in a table by kind and name; statements keep their order.
pub fn nft(raw: &str) -> Vec<String> {
    // Join continuation lines (a statement spanning lines leaves its braces unbalanced) and
    // drop comments; block heads (`chain x {`) and block ends (`}`) are lines of their own.
    let mut logical: Vec<String> = Vec::new();
    let mut pending = String::new();
    for line in raw.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if !pending.is_empty() {
            pending.push(' ');
        }
        pending.push_str(t);
        let balance = pending.matches('{').count() as i64 - pending.matches('}').count() as i64;
        if balance <= 0 || is_block_head(&pending) {
            logical.push(std::mem::take(&mut pending));
        }
    }
    if !pending.is_empty() {
        logical.push(pending);
    }
    // Build the tree.
    let mut stack: Vec<Block> = vec![Block::default()];
    for l in logical {
        if l == "}" {
            if stack.len() > 1 {
                let b = stack.pop().expect("len > 1");
                stack.last_mut().expect("root").children.push(b);
            }
        } else if let Some(head) = l.strip_suffix('{') {
            stack.push(Block {
                head: squash(head),
                ..Block::default()
            });
        } else {
            stack
                .last_mut()
                .expect("root")
                .statements
                .push(nft_statement(&l));
        }
    }
    while stack.len() > 1 {
        let b = stack.pop().expect("len > 1");
        stack.last_mut().expect("root").children.push(b);
    }
    let mut root = stack.pop().expect("root");
    root.children.sort_by(|a, b| a.head.cmp(&b.head));
    let mut out = Vec::new();
    for mut table in root.children {
        // "table ip nat" -> prefix "ip nat"
        let prefix = table
            .head
            .strip_prefix("table ")
            .unwrap_or(&table.head)
            .to_string();
        out.push(table.head.clone());
        for s in &table.statements {
            out.push(format!("{prefix}: {s}"));
        }
        table.children.sort_by(|a, b| a.head.cmp(&b.head));
        for b in table.children {
            emit(&format!("{prefix} {}", b.head), &b, &mut out);
        }
    }
    out
}

/// `table ip nat {`, `chain DOCKER {`, `set x {`, `ct helper x {`: a block opens, no statement.
fn is_block_head(l: &str) -> bool {
    const KINDS: &[&str] = &[
        "table",
        "chain",
        "set",
        "map",
        "flowtable",
        "counter",
        "quota",
        "ct",
        "limit",
        "secmark",
        "synproxy",
    ];
    l.ends_with('{')
        && l.matches('{').count() == 1
        && !l.contains('=')
        && l.split_whitespace()
            .next()
            .is_some_and(|w| KINDS.contains(&w))
}

fn emit(path: &str, b: &Block, out: &mut Vec<String>) {
    out.push(path.to_string());
    for s in &b.statements {
        out.push(format!("{path}: {s}"));
    }
    for c in &b.children {
        emit(&format!("{path} {}", c.head), c, out);
    }
}

/// `ss -Hltunp` as `tcp 0.0.0.0:8080 docker-proxy` (no queues, pids or fds), sorted. UDP
/// sockets on ephemeral ports (a client's) are left out.
pub fn listen(raw: &str) -> Vec<String> {
    sorted(raw.lines().filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 5 {
            return None;
        }
        let (proto, local) = (f[0], f[4]);
        let port: u32 = local.rsplit_once(':')?.1.parse().ok()?;
        if port >= 32768 && proto == "udp" {
            return None;
        }
        // users:(("docker-proxy",pid=858,fd=4),("x",pid=..)): the quoted names.
        let procs = l
            .find("users:(")
            .map(|i| {
                let mut names: Vec<&str> = l[i..].split('"').skip(1).step_by(2).collect();
                names.sort();
                names.dedup();
                names.join(",")
            })
            .unwrap_or_default();
        Some(if procs.is_empty() {
            format!("{proto} {local}")
        } else {
            format!("{proto} {local} {procs}")
        })
    }))
}

/// Interface names made up anew on every container start (`veth8fd6de7`): the same as any other.
fn stable_ifnames(l: &str) -> String {
    l.split_whitespace()
        .map(|w| {
            let hex = w.strip_prefix("veth").unwrap_or("");
            if hex.len() == 7 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
                "veth*"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Units that belong to a login session (a snapshot over SSH opens one), not to the machine.
fn session_unit(u: &str) -> bool {
    u.starts_with("session-")
        || u.starts_with("user@")
        || u.starts_with("user-runtime-dir@")
        || u.starts_with("user-")
}

/// Units that run only on an image's first boot (ConditionFirstBoot, ConditionNeedsUpdate):
/// the post-apply snapshot is taken in the first boot, so they would "vanish" in every reboot.
const FIRST_BOOT_UNITS: &[&str] = &[
    "ldconfig.service",
    "systemd-journal-catalog-update.service",
    "systemd-sysusers.service",
    "systemd-update-done.service",
    "systemd-hwdb-update.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "first-boot-complete.target",
];

/// `systemctl list-units --plain --no-legend` as `UNIT SUB` (active) or `UNIT` (failed), sorted.
/// Devices, scopes, slices and mounts are left out (mounts have their own part), and so are
/// session units (a snapshot over SSH opens a session).
pub fn units(raw: &str, failed: bool) -> Vec<String> {
    sorted(raw.lines().filter_map(|l| {
        let f: Vec<&str> = l
            .trim_start_matches(['●', '*', ' '])
            .split_whitespace()
            .collect();
        if f.len() < 4 {
            return None;
        }
        let (unit, sub) = (f[0], f[3]);
        let kind = unit.rsplit('.').next()?;
        if !failed
            && !matches!(
                kind,
                "service" | "socket" | "timer" | "target" | "path" | "automount"
            )
        {
            return None;
        }
        if session_unit(unit) || FIRST_BOOT_UNITS.contains(&unit) {
            return None;
        }
        Some(if failed {
            unit.to_string()
        } else {
            format!("{unit} {sub}")
        })
    }))
}

/// `docker ps -a --format '{{.Names}}\t{{.Image}}\t{{.State}}\t{{.Ports}}'` as
/// `NAME IMAGE STATE PORTS` with the ports sorted, sorted by name.
pub fn docker(raw: &str) -> Vec<String> {
    sorted(raw.lines().filter(|l| !l.trim().is_empty()).map(|l| {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() < 3 {
            return squash(l);
        }
        let mut ports: Vec<&str> = f
            .get(3)
            .map(|p| {
                p.split(", ")
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        ports.sort();
        let mut s = format!("{} {} {}", f[0], f[1], f[2]);
        if !ports.is_empty() {
            s.push_str(&format!(" {}", ports.join(", ")));
        }
        s
    }))
}

/// `ip route` (v4 and v6) without expiry timers, sorted.
pub fn routes(raw: &str) -> Vec<String> {
    sorted(raw.lines().filter_map(|l| {
        let mut out: Vec<&str> = Vec::new();
        let mut w = l.split_whitespace();
        while let Some(x) = w.next() {
            if x == "expires" {
                w.next();
                continue;
            }
            out.push(x);
        }
        (!out.is_empty()).then(|| stable_ifnames(&out.join(" ")))
    }))
}

/// Filesystem types that are the kernel's own views, not mounts anyone configured.
const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "securityfs",
    "cgroup",
    "cgroup2",
    "pstore",
    "bpf",
    "tracefs",
    "debugfs",
    "mqueue",
    "hugetlbfs",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "autofs",
    "efivarfs",
    "nsfs",
    "rpc_pipefs",
];

/// `findmnt -rn -o TARGET,FSTYPE,SOURCE,OPTIONS` as `TARGET FSTYPE SOURCE rw|ro`, without the
/// kernel's pseudo filesystems and per-session or per-container runtime mounts, sorted.
pub fn mounts(raw: &str) -> Vec<String> {
    sorted(raw.lines().filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 {
            return None;
        }
        let (target, fstype, source, opts) = (f[0], f[1], f[2], f[3]);
        if PSEUDO_FS.contains(&fstype)
            || target.starts_with("/run/user/")
            || target.starts_with("/run/credentials/")
            || target.starts_with("/run/docker/netns/")
            || target.starts_with("/run/netns/")
        {
            return None;
        }
        let rw = opts.split(',').next().unwrap_or("");
        Some(format!("{target} {fstype} {source} {rw}"))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_is_flattened_sorted_and_stripped() {
        let raw = "table ip nat {\n\
                   \tchain DOCKER {\n\
                   \t\tiifname \"docker0\" counter packets 3 bytes 180 return\n\
                   \t\tiifname != \"docker0\" meta l4proto tcp tcp dport 8080 counter packets 0 bytes 0 dnat to 172.17.0.2:80 # handle 9\n\
                   \t}\n\
                   }\n\
                   table inet filter {\n\
                   \tset allowed {\n\
                   \t\ttype ipv4_addr\n\
                   \t\telements = { 10.0.0.1, 10.0.0.2,\n\
                   \t\t\t     10.0.0.3 }\n\
                   \t}\n\
                   \tchain forward {\n\
                   \t\ttype filter hook forward priority filter; policy drop;\n\
                   \t}\n\
                   }\n";
        assert_eq!(
            nft(raw),
            vec![
                "table inet filter",
                "inet filter chain forward",
                "inet filter chain forward: type filter hook forward priority filter; policy drop;",
                "inet filter set allowed",
                "inet filter set allowed: type ipv4_addr",
                "inet filter set allowed: elements = { 10.0.0.1, 10.0.0.2, 10.0.0.3 }",
                "table ip nat",
                "ip nat chain DOCKER",
                "ip nat chain DOCKER: iifname \"docker0\" counter return",
                "ip nat chain DOCKER: iifname != \"docker0\" meta l4proto tcp tcp dport 8080 counter dnat to 172.17.0.2:80",
            ]
        );
    }
}
