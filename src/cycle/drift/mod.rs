//! What the reboot changed: two snapshots of the guest's observable state in every cycle (right
//! after the apply, and right after the reboot), normalised so that only real changes differ, and
//! their diff.
//!
//! A snapshot is the output of ONE guest command ([`SCRIPT`], sectioned text: one SSH round trip
//! is far cheaper under TCG than many) that the parts below are read from:
//! the nft ruleset (`nft -s list ruleset`: no counters, no handles; tables and chains in a stable
//! order, rules in their own), listening sockets, failed and active units, Docker containers and
//! their published ports, routes, selected sysctls, mounts.
//!
//! Collection needs only SSH. When SSH is dead (a lockout), the same script runs through the
//! guest agent; without an agent, what the serial console shows is read instead (the units the
//! boot reported, cloud-init's route table). Each part says where it came from.
//!
//! Every file this module writes into a run directory goes through [`write_file`].

mod console;
mod diff;
mod normalise;
#[cfg(test)]
mod tests_real;

pub use diff::{Finding, SectionDiff, StateDiff, diff};

use crate::Result;
use crate::error::IoContext;
use crate::guest::ssh;
use crate::machine::Machine;
use crate::machine::events::now;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// Where a part of a snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The script over SSH (`sudo -n sh`).
    Ssh,
    /// The script through the QEMU guest agent (as root): SSH did not answer.
    Agent,
    /// Read from the captured serial console: neither SSH nor the agent answered.
    Console,
    /// Nothing could be read.
    None,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Ssh => "ssh",
            Source::Agent => "guest agent",
            Source::Console => "serial console",
            Source::None => "nothing",
        }
    }
}

/// The parts of a snapshot, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    Nft,
    Listen,
    UnitsFailed,
    UnitsActive,
    Docker,
    Routes,
    Sysctl,
    Mounts,
}

impl Part {
    pub const ALL: [Part; 8] = [
        Part::Nft,
        Part::Listen,
        Part::UnitsFailed,
        Part::UnitsActive,
        Part::Docker,
        Part::Routes,
        Part::Sysctl,
        Part::Mounts,
    ];

    /// The section name in the script's output.
    pub fn key(self) -> &'static str {
        match self {
            Part::Nft => "nft",
            Part::Listen => "listen",
            Part::UnitsFailed => "units-failed",
            Part::UnitsActive => "units-active",
            Part::Docker => "docker",
            Part::Routes => "routes",
            Part::Sysctl => "sysctl",
            Part::Mounts => "mounts",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Part::Nft => "nft ruleset",
            Part::Listen => "listening sockets",
            Part::UnitsFailed => "failed units",
            Part::UnitsActive => "active units",
            Part::Docker => "Docker containers",
            Part::Routes => "routes",
            Part::Sysctl => "sysctls",
            Part::Mounts => "mounts",
        }
    }
}

/// The sysctls a snapshot reads (as paths under /proc/sys).
pub const SYSCTLS: &[&str] = &[
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/rp_filter",
    "net/ipv4/conf/default/rp_filter",
    "net/ipv4/conf/all/forwarding",
    "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/bridge/bridge-nf-call-arptables",
];

/// How long a snapshot after a boot waits for the boot to finish (`systemctl
/// is-system-running --wait`, as verify does): Docker re-creates its rules late in the boot.
pub const SETTLE_SECS: u64 = 240;

/// The one guest command: every part as a section (`#### boma-qvm section NAME` ... `#### boma-qvm
/// rc N`), plus the boot_id and systemd's state. Run as root (sudo over SSH; the agent is root).
/// `settle`: first wait (bounded) for the boot to finish.
pub fn script(settle: bool) -> String {
    let sysctls = SYSCTLS.join(" ");
    let wait = if settle {
        format!("timeout {SETTLE_SECS} systemctl is-system-running --wait >/dev/null 2>&1")
    } else {
        ":".into()
    };
    format!(
        r#"export LC_ALL=C PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
s() {{ printf '\n#### boma-qvm section %s\n' "$1"; }}
e() {{ printf '#### boma-qvm rc %s\n' "$1"; }}
{wait}
s system; systemctl is-system-running 2>&1; e 0
s boot-id; cat /proc/sys/kernel/random/boot_id; e $?
s nft; nft -s list ruleset 2>&1; e $?
s listen; ss -Hltunp 2>&1; e $?
s units-failed; systemctl list-units --failed --no-legend --plain --no-pager 2>&1; e $?
s units-active; systemctl list-units --state=active --no-legend --plain --no-pager 2>&1; e $?
s docker; if command -v docker >/dev/null; then docker ps -a --no-trunc --format '{{{{.Names}}}}\t{{{{.Image}}}}\t{{{{.State}}}}\t{{{{.Ports}}}}' 2>&1; e $?; else echo 'docker: not installed'; e 0; fi
s routes; ip -4 route show 2>&1 && ip -6 route show 2>&1; e $?
s sysctl; for k in {sysctls}; do printf '%s = %s\n' "$k" "$(cat /proc/sys/$k 2>/dev/null || echo absent)"; done; e 0
s mounts; findmnt -rn -o TARGET,FSTYPE,SOURCE,OPTIONS 2>&1; e $?
"#
    )
}

/// One part of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Section {
    pub part: Part,
    pub source: Source,
    /// Normalised lines: equal state gives equal lines.
    pub lines: Vec<String>,
    /// Why the part is missing or partial (a command that failed, a console-only view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Section {
    /// False when nothing could be read for this part (its lines mean nothing).
    pub fn available(&self) -> bool {
        self.source != Source::None
    }
}

/// The guest's observable state at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestState {
    /// "before reboot", "after reboot", "now".
    pub when: String,
    /// Seconds since the Unix epoch.
    pub taken: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// `systemctl is-system-running` when it was taken (`running`, `degraded`, `starting`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Why it was not read over SSH (and, for the console, not through the agent either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    pub sections: Vec<Section>,
}

impl GuestState {
    pub fn section(&self, part: Part) -> Option<&Section> {
        self.sections.iter().find(|s| s.part == part)
    }

    /// The lines of `part` (empty when it was not read).
    pub fn lines(&self, part: Part) -> &[String] {
        self.section(part)
            .map(|s| s.lines.as_slice())
            .unwrap_or(&[])
    }

    /// Where the parts came from, e.g. "ssh" or "guest agent" or "ssh, serial console".
    pub fn sources(&self) -> String {
        let mut seen: Vec<&str> = Vec::new();
        for s in &self.sections {
            if !seen.contains(&s.source.as_str()) {
                seen.push(s.source.as_str());
            }
        }
        seen.join(", ")
    }

    /// Parse the script's output, as read from `source`.
    pub fn from_script_output(when: &str, source: Source, raw: &str) -> GuestState {
        let raw_sections = split_sections(raw);
        let meta = |key: &str| {
            raw_sections
                .iter()
                .find(|(k, _, rc)| k == key && *rc == Some(0))
                .map(|(_, body, _)| body.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let (boot_id, system) = (meta("boot-id"), meta("system"));
        let sections = Part::ALL
            .into_iter()
            .map(
                |part| match raw_sections.iter().find(|(k, _, _)| k == part.key()) {
                    Some((_, body, Some(0))) => Section {
                        part,
                        source,
                        lines: normalise::normalise(part, body),
                        note: None,
                    },
                    Some((_, body, rc)) => Section {
                        part,
                        source: Source::None,
                        lines: Vec::new(),
                        note: Some(format!(
                            "not read (exit {}): {}",
                            rc.map_or("?".into(), |c| c.to_string()),
                            first_line(body)
                        )),
                    },
                    None => Section {
                        part,
                        source: Source::None,
                        lines: Vec::new(),
                        note: Some("not in the output (the command was cut short?)".into()),
                    },
                },
            )
            .collect();
        GuestState {
            when: when.to_string(),
            taken: now(),
            boot_id,
            system,
            fallback: None,
            sections,
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
        .chars()
        .take(200)
        .collect()
}

/// The script's output as (section, body, exit code) in order.
fn split_sections(raw: &str) -> Vec<(String, String, Option<i32>)> {
    const SEC: &str = "#### boma-qvm section ";
    const RC: &str = "#### boma-qvm rc ";
    let mut out: Vec<(String, String, Option<i32>)> = Vec::new();
    for line in raw.lines() {
        if let Some(k) = line.strip_prefix(SEC) {
            out.push((k.trim().to_string(), String::new(), None));
        } else if let Some(rc) = line.strip_prefix(RC) {
            if let Some(last) = out.last_mut() {
                last.2 = rc.trim().parse().ok();
            }
        } else if let Some(last) = out.last_mut().filter(|l| l.2.is_none()) {
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    out
}

/// A snapshot and the raw text it was read from (kept in the run directory beside it).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: GuestState,
    pub raw: String,
}

/// Collect the guest's state: the script over SSH; when SSH does not answer (or `ssh_dead` says
/// it is known dead), through the guest agent; when neither answers, from the console log.
/// Never fails: what could not be read is said in the sections' notes.
pub async fn collect(m: &Machine, when: &str, ssh_dead: bool, settle: bool) -> Snapshot {
    let script = script(settle);
    let limit = m.scaled(Duration::from_secs(30))
        + Duration::from_secs(if settle { SETTLE_SECS } else { 0 });
    let mut tried = Vec::new();
    if !ssh_dead {
        match through_ssh(m, &script, limit).await {
            Ok(raw) => {
                return Snapshot {
                    state: GuestState::from_script_output(when, Source::Ssh, &raw),
                    raw: format!("# source: ssh\n{raw}"),
                };
            }
            Err(e) => tried.push(format!("ssh: {}", first_line(&e))),
        }
    } else {
        tried.push("ssh: known dead".into());
    }
    let argv = ["/bin/sh", "-c", script.as_str()];
    match m.agent_exec(&argv, limit).await {
        Ok(o) if o.code == Some(0) => {
            let mut state = GuestState::from_script_output(when, Source::Agent, &o.stdout);
            state.fallback = Some(tried.join("; "));
            return Snapshot {
                state,
                raw: format!("# source: guest agent ({})\n{}", tried.join("; "), o.stdout),
            };
        }
        Ok(o) => tried.push(format!(
            "guest agent: exit {:?}: {}",
            o.code,
            first_line(&o.stderr)
        )),
        Err(e) => tried.push(format!("guest agent: {}", first_line(&e.to_string()))),
    }
    let text = std::fs::read(m.console_log())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let why = tried.join("; ");
    let state = console::state_from_console(when, &text, &why);
    let raw = format!(
        "# source: serial console ({why})\n{}",
        console::last_boot(&text)
    );
    Snapshot { state, raw }
}

async fn through_ssh(
    m: &Machine,
    script: &str,
    limit: Duration,
) -> std::result::Result<String, String> {
    let conn = m.conn().map_err(|e| e.to_string())?;
    let cmd = format!("sudo -n sh -c {}", shell_quote(script));
    let out = ssh::run(&conn, &cmd, limit)
        .await
        .map_err(|e| e.to_string())?;
    if out.status.code() == Some(255) {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    if !out.status.success() {
        return Err(format!(
            "exit {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One POSIX shell word holding `s` exactly (ssh hands the command line to the remote shell).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Write one file into a run directory. Every drift file goes through here (one place to scrub).
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, text).ctx(|| format!("writing {}", p.display()))
}

/// `state-<slug>.json` (normalised) and `state-<slug>.txt` (raw) for a snapshot.
pub fn write_snapshot(dir: &Path, slug: &str, snap: &Snapshot) -> Result<()> {
    let json = serde_json::to_string_pretty(&snap.state).expect("state serialises");
    write_file(dir, &format!("state-{slug}.json"), &json)?;
    write_file(dir, &format!("state-{slug}.txt"), &snap.raw)
}

/// Read back `state-<slug>.json`.
pub fn read_snapshot(dir: &Path, slug: &str) -> Result<GuestState> {
    let p = dir.join(format!("state-{slug}.json"));
    let text = std::fs::read_to_string(&p).ctx(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        crate::Error::input(
            format!("{} does not parse: {e}", p.display()),
            "it is written by a cycle; run the cycle again to make a new one",
        )
    })
}

/// `<name>.txt`: the rendered diff.
pub fn write_diff(dir: &Path, name: &str, d: &StateDiff) -> Result<()> {
    write_file(dir, name, &d.render(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_survives_the_remote_shell_byte_for_byte() {
        let s = script(true);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(&s)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), s);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("sh -n -c {}", shell_quote(&s)))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn sections_split_with_their_exit_codes() {
        let raw = "\n#### boma-qvm section boot-id\nabc\n#### boma-qvm rc 0\n\
                   \n#### boma-qvm section docker\nCannot connect to the Docker daemon\n#### boma-qvm rc 1\n";
        let s = split_sections(raw);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], ("boot-id".into(), "abc\n".into(), Some(0)));
        assert_eq!(s[1].2, Some(1));
        let st = GuestState::from_script_output("now", Source::Ssh, raw);
        assert_eq!(st.boot_id.as_deref(), Some("abc"));
        let d = st.section(Part::Docker).unwrap();
        assert_eq!(d.source, Source::None);
        assert!(
            d.note
                .as_deref()
                .unwrap()
                .contains("(exit 1): Cannot connect"),
            "{d:?}"
        );
        assert!(
            st.section(Part::Nft)
                .unwrap()
                .note
                .as_deref()
                .unwrap()
                .contains("not in the output")
        );
    }
}
