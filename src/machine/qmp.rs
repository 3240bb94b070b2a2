//! The QMP control channel, over the `qapi` crate (async tokio).
//!
//! QEMU gets two monitors: `qmp.sock`, held by the supervisor for the VM's whole life (it records
//! every event into events.jsonl), and `ctl.sock`, which CLI invocations and tests connect to for
//! commands. QMP broadcasts events to every monitor, so commands never race the recorder.

use crate::{Error, Result};
use qapi::futures::{QapiEvents, QapiService, QmpStreamTokio};
use qapi::qmp::QmpCommand;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::UnixStream;

pub type Reader = QmpStreamTokio<ReadHalf<UnixStream>>;
pub type Writer = QmpStreamTokio<WriteHalf<UnixStream>>;
pub type Events = QapiEvents<Reader>;

/// How long one QMP command may take before we call the monitor unresponsive.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Connect and negotiate capabilities, retrying while the socket is not there yet (QEMU is still
/// starting) for up to `timeout`. A socket that accepts but never greets (another client holds the
/// monitor) also ends in a timeout.
pub async fn open(path: &Path, timeout: Duration) -> Result<(QapiService<Writer>, Events)> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let neg = QmpStreamTokio::open_uds(path).await?;
            let stream = neg.negotiate().await?;
            Ok::<_, std::io::Error>(stream.into_parts())
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.max(Duration::from_millis(100)), attempt).await {
            Ok(Ok(parts)) => return Ok(parts),
            Ok(Err(e)) if Instant::now() < deadline => {
                tracing::debug!("QMP {} not ready: {e}", path.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let vm = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "VM".into());
                return Err(Error::qmp(
                    format!(
                        "cannot connect to {}: {e} (QEMU has exited, or is starting or stopping)",
                        path.display()
                    ),
                    format!(
                        "see why in `boma-qvm console {vm} --log` and {}; once it is off, \
                         `boma-qvm start {vm}` powers it on again, and `boma-qvm down {vm}` (or \
                         `boma-qvm prune`) removes it",
                        dir.join("qemu.log").display()
                    ),
                ));
            }
            Err(_) => {
                return Err(Error::qmp(
                    format!(
                        "{} did not answer within {}s (another boma-qvm command may be connected, or QEMU is hung)",
                        path.display(),
                        timeout.as_secs()
                    ),
                    "retry; if it persists, `boma-qvm down` the VM",
                ));
            }
        }
    }
}

/// A command connection. Events on it are discarded: the supervisor records them.
pub struct Qmp {
    service: QapiService<Writer>,
    driver: tokio::task::JoinHandle<()>,
}

impl Qmp {
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let (service, events) = open(path, timeout).await?;
        let driver = events.spawn_tokio();
        Ok(Qmp { service, driver })
    }

    /// Run one command, with `COMMAND_TIMEOUT`.
    pub async fn run<C>(&self, cmd: C) -> Result<C::Ok>
    where
        C: QmpCommand + std::fmt::Debug + 'static,
        Writer: futures::Sink<qapi::Execute<C, u32>, Error = std::io::Error> + Unpin,
    {
        let label = format!("{cmd:?}");
        match tokio::time::timeout(COMMAND_TIMEOUT, self.service.execute(cmd)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::qmp(
                format!("{label} failed: {e}"),
                "QEMU refused the command in the VM's current state: `boma-qvm status` shows it",
            )),
            Err(_) => Err(Error::qmp(
                format!(
                    "{label} got no answer within {}s",
                    COMMAND_TIMEOUT.as_secs()
                ),
                "QEMU may be hung; `boma-qvm down` the VM",
            )),
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// `query-migrate`, answered as raw JSON: the `qapi` crate's typed answer follows a newer QEMU's
/// schema, and a field this QEMU does not send would fail the whole answer.
#[derive(Debug, serde::Serialize)]
pub struct QueryMigrate {}

impl qapi::Command for QueryMigrate {
    type Ok = serde_json::Value;
    const NAME: &'static str = "query-migrate";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for QueryMigrate {}

/// Poll `query-migrate` every 50 ms until the migration is `completed` (its answer) or has
/// failed (`Error::Qemu` with QEMU's own reason), for at most `timeout`. `what` names it in
/// errors ("saving the VM's state to ...").
pub async fn wait_migration(
    service: &QapiService<Writer>,
    what: &str,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = tokio::time::timeout(COMMAND_TIMEOUT, service.execute(QueryMigrate {}))
            .await
            .map_err(|_| {
                Error::qmp(
                    format!("query-migrate got no answer while {what}"),
                    "QEMU may be hung; `boma-qvm down` the VM",
                )
            })?
            .map_err(|e| {
                Error::qmp(
                    format!("query-migrate while {what}: {e}"),
                    "see the VM's qemu.log",
                )
            })?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => return Ok(info),
            "failed" | "cancelled" => {
                return Err(Error::qemu(
                    format!(
                        "{what} failed: {}",
                        info["error-desc"].as_str().unwrap_or("QEMU gave no reason")
                    ),
                    "see the VM's qemu.log; a saved state only restores into the same QEMU with the same devices and sizes",
                ));
            }
            _ if Instant::now() >= deadline => {
                return Err(Error::timeout(
                    what.to_string(),
                    timeout.as_secs(),
                    format!(" (query-migrate: {info})"),
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

impl Qmp {
    /// The raw service, for callers that poll (`wait_migration`).
    pub fn service(&self) -> &QapiService<Writer> {
        &self.service
    }
}
