//! Every stage is timed and logged: `Stages::run` prints the stage as it starts and ends, with
//! its duration and the running total, and keeps a record for report.json.

use crate::Result;
use crate::machine::events::now;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    /// Seconds since the Unix epoch.
    pub started: f64,
    pub seconds: f64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A failure that was retried (an infrastructure failure at first boot): not the verdict.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retried: bool,
}

/// An automatic retry: what failed, and where its evidence is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retry {
    /// The stage that failed ("dhcp lease", "ssh", "boot").
    pub stage: String,
    /// Why, in the error's words.
    pub reason: String,
    /// The failed attempt's console log, kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<std::path::PathBuf>,
}

#[derive(Debug)]
pub struct Stages {
    pub records: Vec<StageRecord>,
    pub retries: Vec<Retry>,
    t0: Instant,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            records: Vec::new(),
            retries: Vec::new(),
            t0: Instant::now(),
        }
    }
}

impl Stages {
    pub fn new() -> Self {
        Self::default()
    }

    /// Run one stage, timing and logging it.
    pub async fn run<T>(&mut self, name: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let started = now();
        let t = Instant::now();
        tracing::info!("==> {name}");
        let r = fut.await;
        let seconds = t.elapsed().as_secs_f64();
        let total = self.t0.elapsed().as_secs_f64();
        match &r {
            Ok(_) => tracing::info!("<== {name}: ok in {seconds:.1}s (total {total:.0}s)"),
            Err(_) => tracing::error!("<== {name}: FAILED after {seconds:.1}s (total {total:.0}s)"),
        }
        let error = r.as_ref().err().map(|e| e.to_string());
        self.records.push(StageRecord {
            name: name.to_string(),
            started,
            seconds,
            ok: r.is_ok(),
            error,
            retried: false,
        });
        r
    }

    /// The last failed stage is being retried: mark it, and record the retry.
    pub fn retrying(&mut self, reason: &str, console: Option<std::path::PathBuf>) {
        let stage = match self.records.iter_mut().rev().find(|r| !r.ok) {
            Some(r) => {
                r.retried = true;
                r.name.clone()
            }
            None => String::new(),
        };
        self.retries.push(Retry {
            stage,
            reason: reason.to_string(),
            console,
        });
    }

    /// The stage that failed last (not retried), if any.
    pub fn failed(&self) -> Option<&StageRecord> {
        self.records.iter().rev().find(|r| !r.ok && !r.retried)
    }

    /// Record a part of the stage just run, timed by the step itself (e.g. a reboot's halves).
    pub fn record(&mut self, name: &str, seconds: f64) {
        tracing::info!("    {name}: {seconds:.1}s");
        self.records.push(StageRecord {
            name: name.to_string(),
            started: now() - seconds,
            seconds,
            ok: true,
            error: None,
            retried: false,
        });
    }

    pub fn total_seconds(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[tokio::test]
    async fn stages_record_outcome_and_duration() {
        let mut s = Stages::new();
        assert_eq!(s.run("one", async { Ok(1) }).await.unwrap(), 1);
        let e = s
            .run("two", async { Err::<(), _>(Error::input("bad", "fix")) })
            .await;
        assert!(e.is_err());
        assert_eq!(s.records.len(), 2);
        assert!(s.records[0].ok && !s.records[1].ok);
        assert!(s.records[1].error.as_deref().unwrap().contains("bad"));
        assert!(s.records[0].seconds >= 0.0);
    }
}
