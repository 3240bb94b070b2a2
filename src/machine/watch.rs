//! Waiting on what happened, not sleeping: a cursor into the VM's events.jsonl
//! (`wait_for_event`) and one into its console log (`expect_console`). Each wait sees what came
//! after the previous one and moves the cursor past what it found.

use super::Machine;
use super::vm::Vm;
use crate::machine::events::{self, Record};
use crate::{Error, Result};
use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

impl Machine {
    /// Wait for the next `event` record (QMP's names: RESET, STOP, BLOCK_IO_ERROR, ...; ours:
    /// QEMU_EXITED, FAULT, ...) after the cursor, and move the cursor past it. Fails fast when
    /// the console shows a guest failure or QEMU exits (unless that is what is awaited).
    pub async fn wait_for_event(&self, event: &str, timeout: Duration) -> Result<Record> {
        self.wait_for(event, timeout, |r| r.is(event)).await
    }

    /// `wait_for_event` with any predicate.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Record) -> bool,
    ) -> Result<Record> {
        let mut tail = self.events.lock().await;
        tail.wait_for(what, timeout, pred)
            .await
            .map_err(|e| self.with_console(e))
    }

    /// Move both cursors back to the VM's first event and console byte (a VM attached after
    /// its boot, whose READY line is already printed).
    pub async fn rewind(&self) {
        *self.events.lock().await = self.vm.tail_from_start();
        *self.console.lock().expect("console cursor") = 0;
    }

    /// Move the event cursor to now: later waits see only later events.
    pub async fn skip_events(&self) {
        *self.events.lock().await = self.vm.tail();
    }

    /// Wait until `needle` appears on the console after the cursor; move the cursor past the
    /// line it is on and return that line. Fails fast on a console failure or QEMU exiting.
    pub async fn expect_console(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut watch = self.vm.tail();
        loop {
            let from = *self.console.lock().expect("console cursor");
            let buf = read_from(&self.vm, from);
            if let Some(at) = buf
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
            {
                let end = buf[at..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(buf.len(), |n| at + n + 1);
                let start = buf[..at]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |n| n + 1);
                *self.console.lock().expect("console cursor") = from + end as u64;
                return Ok(String::from_utf8_lossy(&buf[start..end])
                    .trim_end()
                    .to_string());
            }
            for r in watch.poll()? {
                events::fail_fast(&r)?;
            }
            if Instant::now() >= deadline {
                let what = format!("`{needle}` on {}'s console", self.vm.name);
                return Err(self.with_console(Error::timeout(what, timeout.as_secs(), "")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Move the console cursor to now: later `expect_console` calls see only later output.
    pub fn skip_console(&self) {
        *self.console.lock().expect("console cursor") = console_len(&self.vm);
    }

    /// Bytes in the console log so far (for "nothing was printed between A and B" checks).
    pub fn console_len(&self) -> u64 {
        console_len(&self.vm)
    }

    /// The console output from byte `from` on.
    pub fn console_since(&self, from: u64) -> String {
        String::from_utf8_lossy(&read_from(&self.vm, from)).into_owned()
    }

    /// A wait that failed carries the console tail.
    fn with_console(&self, e: Error) -> Error {
        self.vm.explain(e)
    }
}

pub(crate) fn console_len(vm: &Vm) -> u64 {
    std::fs::metadata(vm.run.console_log())
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The console log's bytes from `from` on.
fn read_from(vm: &Vm, from: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(vm.run.console_log())
        && f.seek(SeekFrom::Start(from)).is_ok()
    {
        let _ = f.read_to_end(&mut buf);
    }
    buf
}
