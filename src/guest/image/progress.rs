//! Download progress: a live `bytes / total  rate  ETA` line on a terminal, otherwise one log line
//! per 10% (or per 100 MiB when the size is unknown).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;

pub struct Progress {
    label: String,
    total: Option<u64>,
    start: Instant,
    tty: bool,
    last_draw: Instant,
    next_mark: u64,
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / MIB)
}

fn hms(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

impl Progress {
    pub fn new(label: &str, total: Option<u64>) -> Self {
        let now = Instant::now();
        let mut p = Progress {
            label: label.into(),
            total,
            start: now,
            tty: std::io::stderr().is_terminal(),
            last_draw: now,
            next_mark: 0,
        };
        p.next_mark = p.step();
        p
    }

    fn step(&self) -> u64 {
        match self.total {
            Some(t) => (t / 10).max(1),
            None => 100 * 1024 * 1024,
        }
    }

    fn rate(&self, done: u64) -> f64 {
        done as f64 / self.start.elapsed().as_secs_f64().max(1e-3)
    }

    fn line(&self, done: u64) -> String {
        let rate = self.rate(done);
        match self.total {
            Some(t) if t > 0 => {
                let eta = if rate > 0.0 {
                    t.saturating_sub(done) as f64 / rate
                } else {
                    0.0
                };
                format!(
                    "{}: {} / {} ({:.0}%)  {:.1} MiB/s  ETA {}",
                    self.label,
                    mib(done),
                    mib(t),
                    done as f64 * 100.0 / t as f64,
                    rate / MIB,
                    hms(eta)
                )
            }
            _ => format!("{}: {}  {:.1} MiB/s", self.label, mib(done), rate / MIB),
        }
    }

    /// `done` bytes so far.
    pub fn update(&mut self, done: u64) {
        if self.tty {
            if self.last_draw.elapsed() >= Duration::from_millis(250) {
                self.last_draw = Instant::now();
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K{}", self.line(done));
                let _ = err.flush();
            }
        } else if done >= self.next_mark {
            tracing::info!("{}", self.line(done));
            while self.next_mark <= done {
                self.next_mark += self.step();
            }
        }
    }

    /// The transfer ended (well or not): end the live line.
    pub fn finish(&mut self, done: u64) {
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "\r\x1b[2K{}", self.line(done));
        }
        tracing::info!(
            bytes = done,
            secs = self.start.elapsed().as_secs_f64(),
            "{}: transferred {} at {:.1} MiB/s",
            self.label,
            mib(done),
            self.rate(done) / MIB
        );
    }
}
