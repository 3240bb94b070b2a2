//! Run a process, streaming its output to the terminal (as is) and a log file (colour stripped,
//! secrets scrubbed), with a timeout that ends its whole process group.

use super::output::strip_ansi;
use crate::error::{Error, IoContext, Result, show};
use crate::secrets::Scrubber;
use std::io::Write;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

/// What a finished run printed (colour stripped, secrets scrubbed) and how it ended.
pub struct Teed {
    pub status: ExitStatus,
    pub lines: Vec<String>,
}

/// Lines from one pipe into the channel.
fn pump(pipe: impl AsyncRead + Unpin + Send + 'static, tx: mpsc::Sender<Vec<u8>>) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(pipe);
        loop {
            let mut buf = Vec::new();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(buf).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Run `cmd` to completion or until `timeout`. `header` is written first to the log.
pub async fn run(
    mut cmd: Command,
    what: &str,
    log: &Path,
    header: &str,
    echo: bool,
    timeout: Duration,
    secrets: &Scrubber,
) -> Result<Teed> {
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent).ctx(|| format!("creating {}", show(parent)))?;
    }
    let mut file = std::fs::File::create(log).ctx(|| format!("creating {}", show(log)))?;
    writeln!(file, "{}", secrets.scrub(header)).ctx(|| format!("writing {}", show(log)))?;

    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().ctx(|| format!("starting {what}"))?;
    let pid = child.id();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
    pump(child.stdout.take().expect("piped"), tx.clone());
    pump(child.stderr.take().expect("piped"), tx);

    let mut lines = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let streamed = tokio::time::timeout_at(deadline, async {
        loop {
            tokio::select! {
                raw = rx.recv() => match raw {
                    Some(raw) => handle(&raw, &mut file, &mut lines, echo, secrets),
                    None => break child.wait().await,
                },
                status = child.wait() => {
                    // Done. A daemonized descendant could hold the pipes open, so drain briefly
                    // instead of waiting for EOF.
                    let grace = tokio::time::Instant::now() + Duration::from_secs(2);
                    while let Ok(Some(raw)) = tokio::time::timeout_at(grace, rx.recv()).await {
                        handle(&raw, &mut file, &mut lines, echo, secrets);
                    }
                    break status;
                }
            }
        }
    })
    .await;

    match streamed {
        Ok(status) => Ok(Teed {
            status: status.ctx(|| format!("waiting for {what}"))?,
            lines,
        }),
        Err(_) => {
            kill_group(pid, &mut child).await;
            let tail: Vec<&str> = lines
                .iter()
                .rev()
                .take(15)
                .rev()
                .map(String::as_str)
                .collect();
            let _ = writeln!(
                file,
                "boma-qvm: timed out after {}s; process group killed",
                timeout.as_secs()
            );
            Err(Error::timeout(
                what,
                timeout.as_secs(),
                format!("\n  log: {}\n{}", show(log), tail.join("\n")),
            ))
        }
    }
}

fn handle(
    raw: &[u8],
    file: &mut std::fs::File,
    lines: &mut Vec<String>,
    echo: bool,
    secrets: &Scrubber,
) {
    let text = secrets.scrub(String::from_utf8_lossy(raw).trim_end_matches(['\n', '\r']));
    if echo {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
    let plain = secrets.scrub(&strip_ansi(&text));
    let _ = writeln!(file, "{plain}");
    lines.push(plain);
}

/// SIGTERM the process group, give it a few seconds, then SIGKILL.
async fn kill_group(pid: Option<u32>, child: &mut tokio::process::Child) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let Some(pid) = pid else { return };
    let pgid = Pid::from_raw(pid as i32);
    let _ = killpg(pgid, Signal::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}
