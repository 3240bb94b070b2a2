//! Small helpers over /proc and signals: is a pid alive, what is its command line, find processes.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::Path;
use std::time::{Duration, Instant};

pub fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); treat it as dead.
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// The parent of `pid` (from /proc/PID/stat), or `None` when it is gone.
pub fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses, so split at the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The argv of `pid` (empty when it is gone).
pub fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The working directory of `pid` (`None` when it is gone or not ours to look at).
pub fn cwd(pid: i32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// The real uid of `pid` (from /proc/PID/status).
pub fn uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Every pid whose argv satisfies `pred`.
pub fn find(pred: impl Fn(&[String]) -> bool) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != std::process::id() as i32)
        .filter(|pid| pred(&cmdline(*pid)))
        .collect()
}

/// True when any argument mentions a path under `dir`.
pub fn mentions(argv: &[String], dir: &Path) -> bool {
    let d = dir.display().to_string();
    argv.iter().any(|a| a.contains(&d))
}

pub fn signal(pid: i32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid), sig);
}

/// Wait until `pid` is gone, up to `timeout`. True when it is gone.
pub async fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// SIGTERM, wait `grace`, then SIGKILL. True when it had to be killed.
pub async fn terminate(pid: i32, grace: Duration) -> bool {
    if !alive(pid) {
        return false;
    }
    signal(pid, Signal::SIGTERM);
    if wait_gone(pid, grace).await {
        return false;
    }
    signal(pid, Signal::SIGKILL);
    wait_gone(pid, Duration::from_secs(5)).await;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppid_of_this_process_is_its_parent() {
        let me = std::process::id() as i32;
        assert_eq!(ppid(me), Some(nix::unistd::getppid().as_raw()));
        assert_eq!(ppid(i32::MAX), None);
    }
}
