//! Finding a VM's address from dnsmasq's lease file (no guest agent needed) and waiting for a
//! service banner (SSH's `SSH-`) on it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::ident::Mac;
use crate::{Error, Result, error::show};

/// One line of dnsmasq's lease file: `<expiry> <mac> <ip> <hostname|*> <client-id|*>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Expiry time (seconds since the epoch; 0 = infinite).
    pub expiry: u64,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub hostname: Option<String>,
}

/// All IPv4 leases of a lease-file text (DHCPv6 `duid` lines and garbage are skipped).
pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                return None;
            }
            Some(Lease {
                expiry: f[0].parse().ok()?,
                mac: f[1].parse().ok()?,
                ip: f[2].parse().ok()?,
                hostname: (f[3] != "*").then(|| f[3].to_string()),
            })
        })
        .collect()
}

/// The newest lease for `mac`: stale entries of an earlier boot may stay in the file, so take
/// the latest expiry (an infinite lease counts as newest; ties go to the later line).
pub fn newest_lease(text: &str, mac: &Mac) -> Option<Lease> {
    let key = |l: &Lease| if l.expiry == 0 { u64::MAX } else { l.expiry };
    parse_leases(text)
        .into_iter()
        .filter(|l| l.mac == *mac)
        .fold(None, |best, l| match best {
            Some(b) if key(&b) > key(&l) => Some(b),
            _ => Some(l),
        })
}

/// Remove every lease line of `mac` from the lease file text (other lines kept verbatim).
pub fn without_mac(text: &str, mac: &Mac) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let is_mac = line
            .split_whitespace()
            .nth(1)
            .and_then(|m| m.parse::<Mac>().ok())
            == Some(*mac);
        if !is_mac {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Poll `lease_file` until it holds a lease for `mac`; returns its address.
pub async fn wait_for_lease(lease_file: &Path, mac: &Mac, timeout: Duration) -> Result<Ipv4Addr> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(lease_file).unwrap_or_default();
        if let Some(l) = newest_lease(&text, mac) {
            tracing::info!(
                "DHCP lease {} for {mac} after {:.1}s",
                l.ip,
                start.elapsed().as_secs_f64()
            );
            return Ok(l.ip);
        }
        if start.elapsed() >= timeout {
            return Err(Error::timeout(
                format!("a DHCP lease for {mac} in {}", show(lease_file)),
                timeout.as_secs(),
                "",
            ));
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// How often a wait looks again: a new connection attempt, a new read of the lease file. What
/// it bounds is how late boma-qvm notices that a service is up (`make bench` measures it).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// At most this many connection attempts in flight (each is bounded by its own timeouts).
const MAX_IN_FLIGHT: usize = 64;

/// Connect to `ip:port` until the service greets with a line starting with `prefix`
/// (e.g. `SSH-`); returns that line. A new connection attempt starts every `PROBE_INTERVAL`
/// without waiting for the previous one (a connect to an address nobody answers ARP for hangs
/// for seconds; a refused one returns at once), so a service is noticed within about one
/// interval of it listening. Only one connection at a time reaches the service: the first that
/// connects is read for the banner while the other attempts are dropped, because every
/// connection that does not authenticate costs sshd a process and the prober's address a
/// penalty (OpenSSH's PerSourcePenalties, MaxStartups). Each attempt is bounded; the whole wait
/// by `timeout`.
pub async fn wait_for_tcp_banner(
    ip: Ipv4Addr,
    port: u16,
    prefix: &str,
    timeout: Duration,
) -> Result<String> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let addr = SocketAddr::from((ip, port));
    let mut last = String::from("no attempt finished");
    let mut tries = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timed_out = |last: &str| {
        Error::timeout(
            format!("a `{prefix}` banner on {addr}"),
            timeout.as_secs(),
            format!(" (last attempt: {last})"),
        )
    };
    loop {
        tokio::select! {
            _ = tick.tick(), if tries.len() < MAX_IN_FLIGHT => {
                tries.spawn(connect(addr));
            }
            Some(done) = tries.join_next() => match done {
                Ok(Ok(stream)) => {
                    tries.abort_all();
                    let read = tokio::time::timeout_at(deadline, read_banner(stream));
                    match read.await {
                        Ok(Ok(line)) if line.starts_with(prefix) => {
                            tracing::info!(
                                "{addr} answered `{line}` after {:.1}s",
                                start.elapsed().as_secs_f64()
                            );
                            return Ok(line);
                        }
                        Ok(Ok(line)) => last = format!("greeted with `{line}`"),
                        Ok(Err(e)) => last = e,
                        Err(_) => return Err(timed_out(&last)),
                    }
                }
                Ok(Err(e)) => last = e,
                Err(_) => {}
            },
            _ = tokio::time::sleep_until(deadline) => {
                tries.abort_all();
                return Err(timed_out(&last));
            }
        }
    }
}

/// Wait for sshd's banner on port 22.
pub async fn wait_for_ssh(ip: Ipv4Addr, timeout: Duration) -> Result<String> {
    wait_for_tcp_banner(ip, 22, "SSH-", timeout).await
}

async fn connect(addr: SocketAddr) -> std::result::Result<tokio::net::TcpStream, String> {
    tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())
}

async fn read_banner(mut s: tokio::net::TcpStream) -> std::result::Result<String, String> {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 256];
        while !buf.contains(&b'\n') && buf.len() < 1024 {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| "no banner within 5s".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    Ok(text.lines().next().unwrap_or("").trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: &str = "52:54:00:aa:bb:cc";
    const FILE: &str = "\
1732600000 52:54:00:aa:bb:cc 192.168.231.21 vm1 01:52:54:00:aa:bb:cc
1732603600 52:54:00:aa:bb:cc 192.168.231.22 vm1 ff:12:34
1732601000 52:54:00:11:22:33 192.168.231.40 * *
duid 00:01:00:01:2a:bb:cc:dd
garbage line
";

    #[test]
    fn parses_and_skips_duid_and_garbage() {
        let l = parse_leases(FILE);
        assert_eq!(l.len(), 3);
        assert_eq!(l[2].hostname, None);
        assert_eq!(l[0].hostname.as_deref(), Some("vm1"));
    }

    #[test]
    fn newest_lease_wins_over_stale_one() {
        let mac: Mac = MAC.parse().unwrap();
        assert_eq!(
            newest_lease(FILE, &mac).unwrap().ip,
            Ipv4Addr::new(192, 168, 231, 22)
        );
        let infinite = format!("{FILE}0 {MAC} 192.168.231.23 vm1 *\n");
        assert_eq!(
            newest_lease(&infinite, &mac).unwrap().ip,
            Ipv4Addr::new(192, 168, 231, 23)
        );
        assert!(newest_lease(FILE, &"52:54:00:00:00:01".parse().unwrap()).is_none());
    }

    #[test]
    fn without_mac_drops_only_that_mac() {
        let mac: Mac = MAC.parse().unwrap();
        let left = without_mac(FILE, &mac);
        assert!(!left.contains(MAC));
        assert!(left.contains("192.168.231.40") && left.contains("duid"));
    }

    #[tokio::test]
    async fn wait_for_lease_sees_a_lease_written_later_and_times_out_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("leases");
        let mac: Mac = MAC.parse().unwrap();
        let e = wait_for_lease(&file, &mac, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        let f2 = file.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::write(f2, FILE).unwrap();
        });
        let ip = wait_for_lease(&file, &mac, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(ip, Ipv4Addr::new(192, 168, 231, 22));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn banner_wait_accepts_ssh_and_rejects_other_greetings() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"220 smtp\r\n").await.unwrap();
            drop(s);
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"SSH-2.0-OpenSSH_9.9\r\n").await.unwrap();
        });
        let line = wait_for_tcp_banner(Ipv4Addr::LOCALHOST, port, "SSH-", Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(line, "SSH-2.0-OpenSSH_9.9");
        server.await.unwrap();
        let e = wait_for_tcp_banner(
            Ipv4Addr::LOCALHOST,
            port,
            "SSH-",
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, Error::Timeout { .. }) && e.to_string().contains("last attempt"),
            "{e}"
        );
    }
}
