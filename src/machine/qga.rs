//! The QEMU guest agent, over the `qapi` crate: a way into the guest that needs neither the
//! network nor SSH. The post-mortem uses it when SSH is dead after a reboot — the incident
//! signature — so the ruleset that locked everyone out is still captured.

use crate::{Error, Result};
use qapi::futures::{QapiService, QgaStreamTokio};
use qapi::qga::{GuestExecCaptureOutput, guest_exec, guest_exec_status};
use std::path::Path;
use std::time::{Duration, Instant};

type Writer = QgaStreamTokio<tokio::io::WriteHalf<tokio::net::UnixStream>>;

/// What a command run through the agent produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
}

/// What to do when the agent does not answer.
const NO_AGENT_FIX: &str = "the image needs qemu-guest-agent running (the built image has it; \
     Debian's genericcloud image does not): use SSH or the console instead";

async fn connect(sock: &Path) -> Result<(QapiService<Writer>, tokio::task::JoinHandle<()>)> {
    let stream = QgaStreamTokio::open_uds(sock).await.map_err(|e| {
        Error::qmp(
            format!("guest agent socket {}: {e}", sock.display()),
            "the VM is not running, or was started without the agent channel",
        )
    })?;
    let (service, events) = stream.into_parts();
    let driver = events.spawn_tokio();
    // The agent answers nothing until a sync; a guest without a running agent never answers.
    let sync = tokio::time::timeout(
        Duration::from_secs(10),
        service.guest_sync(std::process::id() as i32),
    )
    .await;
    match sync {
        Ok(Ok(())) => Ok((service, driver)),
        Ok(Err(e)) => Err(Error::qmp(
            format!("guest agent sync failed: {e}"),
            NO_AGENT_FIX,
        )),
        Err(_) => {
            driver.abort();
            Err(Error::qmp(
                "the guest agent does not answer (not running in the guest?)",
                NO_AGENT_FIX,
            ))
        }
    }
}

/// Run `argv` in the guest as the agent's user (root), waiting up to `timeout`.
pub async fn exec(sock: &Path, argv: &[&str], timeout: Duration) -> Result<ExecOutput> {
    let (service, driver) = connect(sock).await?;
    let run = async {
        let started = service
            .execute(guest_exec {
                path: argv[0].to_string(),
                arg: Some(argv[1..].iter().map(|a| a.to_string()).collect()),
                capture_output: Some(GuestExecCaptureOutput::flag(true)),
                env: None,
                input_data: None,
            })
            .await
            .map_err(|e| Error::qmp(format!("guest-exec {argv:?}: {e}"), NO_AGENT_FIX))?;
        let deadline = Instant::now() + timeout;
        loop {
            let st = service
                .execute(guest_exec_status { pid: started.pid })
                .await
                .map_err(|e| Error::qmp(format!("guest-exec-status: {e}"), NO_AGENT_FIX))?;
            if st.exited {
                let text = |d: Option<Vec<u8>>| {
                    String::from_utf8_lossy(&d.unwrap_or_default()).into_owned()
                };
                return Ok(ExecOutput {
                    code: st.exitcode,
                    stdout: text(st.out_data),
                    stderr: text(st.err_data),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::timeout(
                    format!("{argv:?} through the guest agent"),
                    timeout.as_secs(),
                    "",
                ));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let r = run.await;
    driver.abort();
    r
}
