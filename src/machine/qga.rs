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
    exec_with_input(sock, argv, None, timeout).await
}

/// Step the guest's system clock to the host's, now (`date -u -s @SECONDS.NANOS` through the
/// agent: guest-set-time also wants hwclock, which Debian 13's base system lacks; QEMU's RTC
/// follows the host's clock anyway). For a guest that ran on from a saved state: its clock
/// stopped at the instant of the save.
pub async fn step_clock(sock: &Path, timeout: Duration) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at = format!("@{}.{:09}", now.as_secs(), now.subsec_nanos());
    let out = exec(sock, &["/bin/date", "-u", "-s", &at], timeout).await?;
    if out.code != Some(0) {
        return Err(Error::command(
            format!("date -u -s {at} (through the guest agent)"),
            format!("exit {:?}", out.code),
            format!("{}{}", out.stdout, out.stderr),
        ));
    }
    Ok(())
}

/// Set the guest's clock to `unix_nanos` (`guest-set-time`: the system clock, then the RTC
/// from it), now.
pub async fn set_time(sock: &Path, unix_nanos: i64) -> Result<()> {
    let (service, driver) = connect(sock).await?;
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        service.execute(qapi::qga::guest_set_time {
            time: Some(unix_nanos),
        }),
    )
    .await;
    driver.abort();
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Error::qmp(format!("guest-set-time: {e}"), NO_AGENT_FIX)),
        Err(_) => Err(Error::timeout("guest-set-time", 30, "")),
    }
}

/// `exec`, with `input` as the command's standard input.
pub async fn exec_with_input(
    sock: &Path,
    argv: &[&str],
    input: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<ExecOutput> {
    let (service, driver) = connect(sock).await?;
    let run = async {
        let started = service
            .execute(guest_exec {
                path: argv[0].to_string(),
                arg: Some(argv[1..].iter().map(|a| a.to_string()).collect()),
                capture_output: Some(GuestExecCaptureOutput::flag(true)),
                env: None,
                input_data: input,
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
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let r = run.await;
    driver.abort();
    r
}
