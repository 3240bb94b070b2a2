//! The VM's `events.jsonl`: every QMP event QEMU emits (recorded by the supervisor for the VM's
//! whole life), what the console watcher saw, and every fault boma-qvm injected — one JSON object
//! per line, with a timestamp, so a run's report shows what happened when.
//!
//! Waiting is tailing this file: `Tail::wait_for` returns when a matching record arrives, and fails
//! fast when the console watcher reported a guest failure or QEMU exited.

use crate::error::IoContext;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A QMP event from QEMU.
    Qemu,
    /// The supervisor's own lifecycle records.
    Boma,
    /// The console watcher.
    Console,
    /// A fault injected by a test or `boma-qvm fault`.
    Fault,
}

/// Record names boma-qvm writes itself (QEMU's use QMP's names: RESET, SHUTDOWN, ...).
pub mod names {
    // QEMU's own (QMP events).
    pub const RESET: &str = "RESET";
    pub const SHUTDOWN: &str = "SHUTDOWN";
    pub const POWERDOWN: &str = "POWERDOWN";
    pub const STOP: &str = "STOP";
    pub const RESUME: &str = "RESUME";
    pub const GUEST_PANICKED: &str = "GUEST_PANICKED";
    pub const BLOCK_IO_ERROR: &str = "BLOCK_IO_ERROR";
    // boma-qvm's own.
    pub const QEMU_STARTED: &str = "QEMU_STARTED";
    pub const QEMU_EXITED: &str = "QEMU_EXITED";
    pub const CONSOLE_FAILURE: &str = "CONSOLE_FAILURE";
    pub const CONSOLE_BOOT: &str = "CONSOLE_BOOT";
    /// The console says the boot is done (cloud-init's final stage, a login prompt, systemd's
    /// default target); `data.signal` says which.
    pub const BOOT_DONE: &str = "BOOT_DONE";
    /// A lockout was called: SSH gone while the guest is alive (`data`: after what, how SSH
    /// failed, the boot-done signal and how long after it).
    pub const LOCKOUT: &str = "LOCKOUT";
    pub const FAULT: &str = "FAULT";
    pub const FAULT_FAILED: &str = "FAULT_FAILED";
    /// The supervisor restored a saved state instead of booting (a warm start).
    pub const RESTORED: &str = "RESTORED";
    /// The VM's memory and device state was saved to a file (`Machine::save_state`).
    pub const STATE_SAVED: &str = "STATE_SAVED";
    /// `qemu-img check` of the overlay before a power-on.
    pub const DISK_CHECK: &str = "DISK_CHECK";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Seconds since the Unix epoch.
    pub ts: f64,
    pub source: Source,
    pub event: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Record {
    pub fn new(source: Source, event: &str, data: Value) -> Self {
        Record {
            ts: now(),
            source,
            event: event.to_string(),
            data,
        }
    }

    /// From a QMP event as QEMU sent it (`{"event":..,"data":..,"timestamp":{"seconds","microseconds"}}`).
    pub fn from_qmp(raw: &Value) -> Self {
        let ts = raw["timestamp"]["seconds"].as_f64().unwrap_or_else(now)
            + raw["timestamp"]["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
        Record {
            ts,
            source: Source::Qemu,
            event: raw["event"].as_str().unwrap_or("UNKNOWN").to_string(),
            data: raw.get("data").cloned().unwrap_or(Value::Null),
        }
    }

    pub fn is(&self, event: &str) -> bool {
        self.event == event
    }
}

/// Append one record. Lines are written with a single `write` on an O_APPEND file, so the
/// supervisor and a CLI recording a fault never interleave within a line.
pub fn append(path: &Path, rec: &Record) -> Result<()> {
    let mut line = serde_json::to_vec(rec).expect("record serialises");
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .ctx(|| format!("opening {}", path.display()))?;
    f.write_all(&line)
        .ctx(|| format!("appending to {}", path.display()))
}

/// Every record in the file (a missing file is an empty log; a torn last line is skipped).
pub fn read_all(path: &Path) -> Result<Vec<Record>> {
    let mut t = Tail::from_start(path);
    t.poll()
}

/// Reads records appended since the last poll.
pub struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// Records read but not handed out yet: the ones after a record `wait_for` returned.
    unread: Vec<Record>,
}

impl Tail {
    pub fn from_start(path: &Path) -> Self {
        Tail {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
            unread: Vec::new(),
        }
    }

    /// Start at the current end: only records written from now on.
    pub fn from_end(path: &Path) -> Self {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Tail {
            path: path.to_path_buf(),
            offset,
            partial: Vec::new(),
            unread: Vec::new(),
        }
    }

    pub fn poll(&mut self) -> Result<Vec<Record>> {
        let mut out = std::mem::take(&mut self.unread);
        out.extend(self.read_new()?);
        Ok(out)
    }

    fn read_new(&mut self) -> Result<Vec<Record>> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::Io {
                    context: format!("opening {}", self.path.display()),
                    source: e,
                });
            }
        };
        f.seek(SeekFrom::Start(self.offset))
            .ctx(|| format!("seeking {}", self.path.display()))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .ctx(|| format!("reading {}", self.path.display()))?;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let mut out = Vec::new();
        while let Some(nl) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            if let Ok(r) = serde_json::from_slice::<Record>(&line) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Wait until a record matches `pred`. Fails fast on a console failure or QEMU exiting
    /// (unless `pred` accepts that record), and with `Error::Timeout` after `timeout`.
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Record) -> bool,
    ) -> Result<Record> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut recs = self.poll()?.into_iter();
            while let Some(r) = recs.next() {
                if pred(&r) {
                    // What came after it is for the next wait.
                    self.unread = recs.collect();
                    return Ok(r);
                }
                fail_fast(&r)?;
            }
            if Instant::now() >= deadline {
                return Err(Error::timeout(what, timeout.as_secs(), ""));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Resolves with the first failure record (console failure, QEMU exit) `tail` sees; for racing
/// a wait that does not watch events itself.
pub async fn first_failure(mut tail: Tail) -> Error {
    loop {
        match tail.poll() {
            Ok(recs) => {
                if let Some(e) = recs.iter().find_map(|r| fail_fast(r).err()) {
                    return e;
                }
            }
            Err(e) => return e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The records that end any wait: the guest failed on its console or panicked, or QEMU is gone.
pub fn fail_fast(r: &Record) -> Result<()> {
    if r.is(names::GUEST_PANICKED) {
        // Named like the console's pattern, so a first-boot panic is retried either way.
        return Err(Error::GuestFailure {
            pattern: "Kernel panic (QEMU: GUEST_PANICKED)".into(),
            detail: format!(
                "the guest kernel panicked ({}); the VM is paused where it panicked: read console.log in its run directory, or `boma-qvm console`",
                r.data
            ),
            fix: "read the console log (`boma-qvm console VM --log`); the VM stays paused for \
                  inspection until `boma-qvm down`; under TCG a first-boot panic is a known \
                  emulator race and `up`/`cycle` retry it once"
                .into(),
        });
    }
    if r.is(names::CONSOLE_FAILURE) {
        return Err(Error::GuestFailure {
            pattern: r.data["pattern"].as_str().unwrap_or("?").to_string(),
            detail: r.data["line"].as_str().unwrap_or("").to_string(),
            fix: "read the console log (`boma-qvm console VM --log`): under TCG a first-boot \
                  kernel panic is a known emulator race and `up`/`cycle` retry it once"
                .into(),
        });
    }
    if r.is(names::QEMU_EXITED) {
        return Err(Error::qemu(
            format!(
                "QEMU exited while waiting ({})",
                r.data["status"].as_str().unwrap_or("?")
            ),
            "see the VM's qemu.log and console.log in its run directory (`boma-qvm status`)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qmp_events_keep_qemus_timestamp() {
        let raw = json!({"event":"RESET","data":{"guest":true,"reason":"guest-reset"},
                         "timestamp":{"seconds":100,"microseconds":500000}});
        let r = Record::from_qmp(&raw);
        assert_eq!(r.ts, 100.5);
        assert_eq!(r.event, "RESET");
        assert_eq!(r.data["reason"], "guest-reset");
        assert_eq!(r.source, Source::Qemu);
    }

    #[test]
    fn tail_sees_only_new_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        append(&p, &Record::new(Source::Boma, "A", Value::Null)).unwrap();
        let mut t = Tail::from_end(&p);
        assert!(t.poll().unwrap().is_empty());
        append(
            &p,
            &Record::new(Source::Fault, "B", json!({"kind":"freeze"})),
        )
        .unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"ts\":1,")
            .unwrap();
        let got = t.poll().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].event, "B");
        assert_eq!(
            read_all(&p).unwrap().len(),
            2,
            "the torn line is not a record"
        );
    }

    #[tokio::test]
    async fn waits_fail_fast_on_console_failure() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let mut t = Tail::from_start(&p);
        append(
            &p,
            &Record::new(
                Source::Console,
                names::CONSOLE_FAILURE,
                json!({"pattern":"Kernel panic","line":"Kernel panic - not syncing"}),
            ),
        )
        .unwrap();
        let e = t
            .wait_for("RESET", Duration::from_secs(30), |r| r.is("RESET"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::GuestFailure { .. }), "{e}");
    }

    #[tokio::test]
    async fn waits_fail_fast_on_a_guest_panicked_event() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let mut t = Tail::from_start(&p);
        let raw = json!({"event":"GUEST_PANICKED","data":{"action":"pause"},
                         "timestamp":{"seconds":100,"microseconds":0}});
        append(&p, &Record::from_qmp(&raw)).unwrap();
        let e = t
            .wait_for("RESET", Duration::from_secs(30), |r| r.is("RESET"))
            .await
            .unwrap_err();
        match &e {
            Error::GuestFailure {
                pattern, detail, ..
            } => {
                assert!(pattern.contains("Kernel panic"), "{pattern}");
                assert!(detail.contains("pause"), "{detail}");
            }
            other => panic!("expected a guest failure, got {other}"),
        }
        assert_eq!(e.exit_code(), 10);
    }

    /// SHUTDOWN and RESET written before anyone waits (a clean reboot that finished while the
    /// test thread was slow): a wait for SHUTDOWN, then one for RESET, sees both. Seen failing
    /// in CI under load before: the RESET read in the same batch as SHUTDOWN was dropped.
    #[tokio::test]
    async fn consecutive_waits_see_records_read_in_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let mut t = Tail::from_start(&p);
        for e in ["POWERDOWN", "SHUTDOWN", "RESET"] {
            append(&p, &Record::new(Source::Qemu, e, Value::Null)).unwrap();
        }
        let d = Duration::from_millis(300);
        assert_eq!(
            t.wait_for("SHUTDOWN", d, |r| r.is("SHUTDOWN"))
                .await
                .unwrap()
                .event,
            "SHUTDOWN"
        );
        assert_eq!(
            t.wait_for("RESET", d, |r| r.is("RESET"))
                .await
                .unwrap()
                .event,
            "RESET"
        );
        assert!(
            t.poll().unwrap().is_empty(),
            "each record is handed out once"
        );
        assert!(t.wait_for("RESET", d, |r| r.is("RESET")).await.is_err());
    }

    #[tokio::test]
    async fn waits_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tail::from_start(&dir.path().join("none.jsonl"));
        let e = t
            .wait_for("RESET", Duration::from_millis(200), |r| r.is("RESET"))
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), 9);
    }
}
