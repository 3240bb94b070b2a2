//! The serial console: QEMU writes it to a pty and to `console.log` from the first byte.
//!
//! - `watch` (run by the supervisor) follows the log and records failure patterns (kernel panic,
//!   emergency mode, ...) and boots as events, so waits fail fast instead of timing out.
//! - `attach` connects the terminal to the pty in raw mode; Ctrl-] detaches.
//! - `tail` / `print_log` read the captured log.

use crate::Result;
use crate::error::IoContext;
use crate::machine::events::{self, Record, Source, names};
use serde_json::json;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The escape byte that ends `attach` (Ctrl-]).
pub const ESCAPE: u8 = 0x1d;

/// Seen at the start of every Linux boot; recorded as `CONSOLE_BOOT`.
const BOOT_MARKER: &str = "Linux version ";

/// The console lines that say a boot is done, and what each one is (the `signal` of a
/// `BOOT_DONE` record): cloud-init's final stage, a getty's login prompt, systemd reaching the
/// default target (printed only while nothing else owns the console).
pub fn boot_done_signal(line: &str) -> Option<&'static str> {
    let l = strip_colour(line);
    let l = l.trim_end();
    if l.contains("Cloud-init v. ") && l.contains(" finished at ") {
        return Some("cloud-init final stage finished");
    }
    if l.contains("Reached target multi-user.target")
        || l.contains("Reached target graphical.target")
    {
        return Some("systemd reached its default target");
    }
    // "askari login: " (the prompt has no newline; kernel messages may follow on its line).
    let mut w = l.split_whitespace();
    if let (Some(host), Some("login:")) = (w.next(), w.next())
        && !host.starts_with('[')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Some("getty login prompt");
    }
    None
}

fn strip_colour(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for n in it.by_ref() {
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// Classify one console line: a failure pattern, a boot, a boot that is done, or nothing.
pub fn classify(line: &str, failures: &[String]) -> Option<Record> {
    if let Some(p) = failures.iter().find(|p| line.contains(p.as_str())) {
        return Some(Record::new(
            Source::Console,
            names::CONSOLE_FAILURE,
            json!({"pattern": p, "line": line}),
        ));
    }
    if line.contains(BOOT_MARKER) {
        return Some(Record::new(
            Source::Console,
            names::CONSOLE_BOOT,
            json!({"line": line}),
        ));
    }
    if let Some(signal) = boot_done_signal(line) {
        return Some(Record::new(
            Source::Console,
            names::BOOT_DONE,
            json!({"signal": signal, "line": strip_colour(line).trim_end()}),
        ));
    }
    None
}

/// Follow `log` from its current end and append classified lines to `events` until cancelled.
pub async fn watch(log: PathBuf, events_path: PathBuf, failures: Vec<String>) {
    let mut offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let mut partial = String::new();
    let mut prompt_seen = false;
    loop {
        if let Ok(mut f) = std::fs::File::open(&log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < offset {
                offset = 0;
            }
            let mut buf = Vec::new();
            if f.seek(SeekFrom::Start(offset)).is_ok() && f.read_to_end(&mut buf).is_ok() {
                offset += buf.len() as u64;
                partial.push_str(&String::from_utf8_lossy(&buf));
                while let Some(nl) = partial.find('\n') {
                    let line: String = partial.drain(..=nl).collect();
                    let line = line.trim_end_matches(['\r', '\n']);
                    // A login prompt seen while it was the unfinished last line is recorded.
                    let seen = std::mem::take(&mut prompt_seen);
                    match classify(line, &failures) {
                        Some(rec) if seen && rec.is(names::BOOT_DONE) => {}
                        Some(rec) => record(&events_path, rec, line),
                        None => {}
                    }
                }
                // A getty's prompt waits for input without a newline: look at the partial line.
                if !prompt_seen
                    && partial.trim_end().ends_with("login:")
                    && let Some(rec) = classify(partial.trim_end(), &failures)
                {
                    prompt_seen = true;
                    record(&events_path, rec, partial.trim_end());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn record(events_path: &Path, rec: Record, line: &str) {
    tracing::info!("console: {} ({line})", rec.event);
    if let Err(e) = events::append(events_path, &rec) {
        tracing::warn!("cannot record console event: {e}");
    }
}

/// The last `n` lines of the console log (for error messages and post-mortems).
pub fn tail(log: &Path, n: usize) -> String {
    let Ok(bytes) = std::fs::read(log) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Print the captured log; with `follow`, keep printing what arrives while `running()` holds.
pub async fn print_log(log: &Path, follow: bool, running: impl Fn() -> bool) -> Result<()> {
    let mut out = std::io::stdout();
    let mut offset = 0u64;
    loop {
        if let Ok(mut f) = std::fs::File::open(log) {
            f.seek(SeekFrom::Start(offset))
                .ctx(|| format!("seeking {}", log.display()))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)
                .ctx(|| format!("reading {}", log.display()))?;
            offset += buf.len() as u64;
            out.write_all(&buf).ctx(|| "writing to stdout".into())?;
            out.flush().ok();
        }
        if !follow || !running() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Restores the terminal's settings when dropped, also on error paths.
struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(stdin.as_fd()) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw);
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin().as_fd(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// Connect the terminal to the VM's serial pty until Ctrl-] (or the pty closes). Blocking.
pub fn attach(pty: &Path, name: &str) -> Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(pty)
        .ctx(|| format!("opening the console pty {}", pty.display()))?;
    eprint!(
        "Connected to {name}'s serial console ({}). Escape: Ctrl-]\r\n",
        pty.display()
    );
    let _raw = RawMode::enter();
    let mut stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        let (in_ready, dev_ready, dev_gone) = {
            let mut fds = [
                PollFd::new(stdin.as_fd(), PollFlags::POLLIN),
                PollFd::new(dev.as_fd(), PollFlags::POLLIN),
            ];
            poll(&mut fds, PollTimeout::from(500u16))
                .map_err(std::io::Error::from)
                .ctx(|| "polling the console".into())?;
            let ev = |i: usize| fds[i].revents().unwrap_or(PollFlags::empty());
            (
                ev(0).intersects(PollFlags::POLLIN | PollFlags::POLLHUP),
                ev(1).contains(PollFlags::POLLIN),
                ev(1).intersects(PollFlags::POLLERR | PollFlags::POLLNVAL),
            )
        };
        if dev_ready {
            let n = dev.read(&mut buf).unwrap_or(0);
            if n > 0 {
                stdout.write_all(&buf[..n]).ok();
                stdout.flush().ok();
            }
        }
        if in_ready {
            let n = stdin.read(&mut buf).ctx(|| "reading stdin".into())?;
            if n == 0 {
                break;
            }
            if let Some(i) = buf[..n].iter().position(|b| *b == ESCAPE) {
                dev.write_all(&buf[..i]).ok();
                break;
            }
            dev.write_all(&buf[..n])
                .ctx(|| "writing to the console".into())?;
        }
        if dev_gone || !pty.exists() {
            break;
        }
    }
    drop(_raw);
    eprint!("\r\nDetached from {name}'s console.\r\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats() -> Vec<String> {
        crate::machine::spec::DEFAULT_FAILURE_PATTERNS
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn panics_and_emergency_mode_are_failures() {
        let r = classify(
            "[  117.2] Kernel panic - not syncing: Fatal exception in interrupt",
            &pats(),
        )
        .unwrap();
        assert_eq!(r.event, names::CONSOLE_FAILURE);
        assert_eq!(r.data["pattern"], "Kernel panic - not syncing");
        assert!(
            classify(
                "You are in emergency mode. After logging in, type ...",
                &pats()
            )
            .is_some()
        );
        assert!(classify("[  OK  ] Started ssh.service", &pats()).is_none());
    }

    #[test]
    fn boots_are_recorded() {
        let r = classify(
            "[    0.000000] Linux version 6.12.0 (debian-kernel@...)",
            &pats(),
        )
        .unwrap();
        assert_eq!(r.event, names::CONSOLE_BOOT);
    }

    #[test]
    fn a_finished_boot_is_recorded_with_its_signal() {
        for (line, signal) in [
            (
                "[  140.008545] cloud-init[555]: Cloud-init v. 25.1.4 finished at Sun, 06 Dec 2026 11:16:16 +0000. Datasource DataSourceNoCloud [seed=/dev/vdb].  Up 139.97 seconds\r",
                "cloud-init final stage finished",
            ),
            (
                "rh2 login: [  108.613073] sh[649]: Completed socket interaction for boot stage config",
                "getty login prompt",
            ),
            ("boma-it-askari login:", "getty login prompt"),
            (
                "[\u{1b}[0;32m  OK  \u{1b}[0m] Reached target \u{1b}[0;1;39mmulti-user.target\u{1b}[0m - Multi-User System.",
                "systemd reached its default target",
            ),
        ] {
            let r = classify(line, &pats()).unwrap_or_else(|| panic!("{line}"));
            assert_eq!(r.event, names::BOOT_DONE, "{line}");
            assert_eq!(r.data["signal"], signal, "{line}");
        }
        for line in [
            "[   98.510572] cloud-init[555]: Cloud-init v. 25.1.4 running 'modules:config' at Sun",
            "[  OK  ] Reached target getty.target - Login Prompts.",
            "[  OK  ] Reached target network.target - Network.",
            "Debian GNU/Linux 13 rh2 ttyS0",
        ] {
            assert!(classify(line, &pats()).is_none(), "{line}");
        }
    }

    #[tokio::test]
    async fn the_watcher_records_a_prompt_that_has_no_newline_once() {
        let d = tempfile::tempdir().unwrap();
        let (log, ev) = (d.path().join("console.log"), d.path().join("events.jsonl"));
        std::fs::write(&log, "").unwrap();
        let w = tokio::spawn(watch(log.clone(), ev.clone(), pats()));
        // The watcher follows from the end it finds when it starts.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let append = |s: &str| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .unwrap()
                .write_all(s.as_bytes())
                .unwrap();
        };
        append("Debian GNU/Linux 13 askari ttyS0\r\n\r\naskari login: ");
        let mut t = events::Tail::from_start(&ev);
        let r = t
            .wait_for("BOOT_DONE", Duration::from_secs(5), |r| {
                r.is(names::BOOT_DONE)
            })
            .await
            .unwrap();
        assert_eq!(r.data["signal"], "getty login prompt");
        append("[  116.9] audit: type=1400\r\n[  117.0] more\r\n");
        tokio::time::sleep(Duration::from_millis(800)).await;
        w.abort();
        let all = events::read_all(&ev).unwrap();
        assert_eq!(
            all.iter().filter(|r| r.is(names::BOOT_DONE)).count(),
            1,
            "{all:?}"
        );
    }

    #[test]
    fn extra_patterns_from_the_spec() {
        let p = vec!["BOMA-TESTGUEST-FAIL".to_string()];
        assert_eq!(
            classify("x BOMA-TESTGUEST-FAIL y", &p).unwrap().event,
            names::CONSOLE_FAILURE
        );
    }

    #[test]
    fn tail_gives_the_last_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.log");
        std::fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&p, 2), "b\nc");
        assert_eq!(tail(&d.path().join("none"), 5), "");
    }
}
