//! The QEMU guest agent, over the `qapi` crate: a way into the guest that needs neither the
//! network nor SSH. The post-mortem uses it when SSH is dead after a reboot — the incident
//! signature — so the ruleset that locked everyone out is still captured.
//!
//! The host end of the agent's channel is held open by the supervisor for the VM's whole life
//! (`relay`), as libvirt holds its agent connection: qemu-ga must never be left with a reply
//! and nobody on the host end. Its write loop retries EAGAIN without end while the host end is
//! closed, and its SIGTERM handler only asks that (never reached) main loop to quit, so a
//! client that hung up before the reply cost every later guest shutdown 90 s: systemd's stop
//! timeout, then SIGKILL ("Job qemu-guest-agent.service/stop running (1min 30s / 1min 30s)").

use crate::{Error, Result};
use qapi::futures::{QapiService, QgaStreamTokio};
use qapi::qga::{GuestExecCaptureOutput, guest_exec, guest_exec_status};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

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

/// How long a write to either end may stall before the relay gives up on the client.
const RELAY_WRITE: Duration = Duration::from_secs(5);

async fn connect_when_there(sock: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(sock).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::qemu(
                    format!("QEMU's guest agent channel {}: {e}", sock.display()),
                    "see qemu.log in the VM's run directory",
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn read_client(client: &mut Option<UnixStream>, buf: &mut [u8]) -> std::io::Result<usize> {
    match client {
        Some(c) => c.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Hold QEMU's end of the agent channel (`qemu_sock`, QEMU listening) open until QEMU closes it,
/// and serve `client_sock` to one client at a time (others wait in the listen backlog, as they did
/// on QEMU's own socket): bytes are copied both ways while a client is attached; what the agent
/// sends while none is (a reply to a client that hung up) is read and dropped, so the agent's
/// write always completes.
pub async fn relay(qemu_sock: &Path, client_sock: &Path) -> Result<()> {
    let qemu = connect_when_there(qemu_sock, Duration::from_secs(30)).await?;
    let _ = std::fs::remove_file(client_sock);
    let listener = UnixListener::bind(client_sock).map_err(|e| {
        Error::qemu(
            format!("cannot listen on {}: {e}", client_sock.display()),
            "check the VM's run directory is writable",
        )
    })?;
    let (mut from_qemu, mut to_qemu) = qemu.into_split();
    let mut client: Option<UnixStream> = None;
    let mut qbuf = vec![0u8; 64 * 1024];
    let mut cbuf = vec![0u8; 64 * 1024];
    loop {
        let attached = client.is_some();
        tokio::select! {
            r = from_qemu.read(&mut qbuf) => {
                let n = match r {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(n) => n,
                };
                match client.as_mut() {
                    Some(c) => {
                        let sent = tokio::time::timeout(RELAY_WRITE, c.write_all(&qbuf[..n])).await;
                        if !matches!(sent, Ok(Ok(()))) {
                            tracing::info!("guest agent relay: the client stopped reading; detached it");
                            client = None;
                        }
                    }
                    None => tracing::info!(
                        "guest agent relay: dropped {n} bytes from the agent with no client attached (a reply to a client that hung up)"
                    ),
                }
            }
            r = read_client(&mut client, &mut cbuf), if attached => {
                match r {
                    Ok(n) if n > 0 => {
                        let sent = tokio::time::timeout(RELAY_WRITE, to_qemu.write_all(&cbuf[..n])).await;
                        match sent {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return Ok(()),
                            Err(_) => {
                                tracing::info!("guest agent relay: the agent does not take input (not running?); detached the client");
                                client = None;
                            }
                        }
                    }
                    _ => client = None,
                }
            }
            r = listener.accept(), if !attached => {
                if let Ok((c, _)) = r {
                    client = Some(c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    async fn wait_for_socket(p: &Path) {
        for _ in 0..100 {
            if p.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} never appeared", p.display());
    }

    /// The listening end plays QEMU's chardev socket (what the guest agent writes arrives there).
    #[tokio::test]
    async fn the_relay_drains_replies_nobody_waits_for_and_serves_the_next_client() {
        let d = tempfile::tempdir().unwrap();
        let (qemu_sock, client_sock) = (d.path().join("q.sock"), d.path().join("c.sock"));
        let qemu = UnixListener::bind(&qemu_sock).unwrap();
        let relay = tokio::spawn({
            let (q, c) = (qemu_sock.clone(), client_sock.clone());
            async move { relay(&q, &c).await }
        });
        let (agent, _) = qemu.accept().await.unwrap();
        let (agent_rx, mut agent_tx) = agent.into_split();
        let mut agent_rx = BufReader::new(agent_rx).lines();
        wait_for_socket(&client_sock).await;

        // A client asks, then hangs up before the answer.
        let mut hasty = UnixStream::connect(&client_sock).await.unwrap();
        hasty
            .write_all(b"{\"execute\":\"guest-ping\"}\n")
            .await
            .unwrap();
        assert_eq!(
            agent_rx.next_line().await.unwrap().unwrap(),
            "{\"execute\":\"guest-ping\"}"
        );
        drop(hasty);
        // The agent's answer (made far bigger than any socket buffer) still goes out: the host
        // end takes it.
        let big = vec![b' '; 8 << 20];
        tokio::time::timeout(Duration::from_secs(20), agent_tx.write_all(&big))
            .await
            .expect("the agent's write blocked: nobody drains the host end")
            .unwrap();
        agent_tx.write_all(b"\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;

        // The next client gets a round trip.
        let c = UnixStream::connect(&client_sock).await.unwrap();
        let (c_rx, mut c_tx) = c.into_split();
        c_tx.write_all(b"{\"execute\":\"guest-sync\"}\n")
            .await
            .unwrap();
        assert_eq!(
            agent_rx.next_line().await.unwrap().unwrap(),
            "{\"execute\":\"guest-sync\"}"
        );
        agent_tx.write_all(b"{\"return\": 7}\n").await.unwrap();
        let mut c_rx = BufReader::new(c_rx).lines();
        let reply = tokio::time::timeout(Duration::from_secs(10), c_rx.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply, "{\"return\": 7}");

        // QEMU going away ends the relay.
        drop((agent_rx, agent_tx));
        tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the relay outlived QEMU's end")
            .unwrap()
            .unwrap();
    }
}
