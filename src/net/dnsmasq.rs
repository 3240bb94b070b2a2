//! The network's own dnsmasq: config rendered from `net/dnsmasq.conf.tmpl`, started, checked,
//! reloaded (SIGHUP) and stopped by its pid file, never by name.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::config::NetConfig;
use super::files::{DHCP_HOSTS, HOSTS, NetFiles, SERVERS};
use super::owned::Owned;
use crate::paths::write_atomic_mode;
use crate::tools;
use crate::{Error, Result, error::show};

const TEMPLATE: &str = include_str!("../../net/dnsmasq.conf.tmpl");

/// The dnsmasq config for `cfg`, dropping to `user` and `group` once it has its sockets.
pub fn render(cfg: &NetConfig, files: &NetFiles, user: &str, group: &str) -> String {
    let p = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    TEMPLATE
        .replace("@USER@", user)
        .replace("@GROUP@", group)
        .replace("@BRIDGE@", &cfg.bridge)
        .replace("@NETWORK@", &cfg.subnet.network().to_string())
        .replace("@NETMASK@", &cfg.subnet.netmask().to_string())
        .replace("@GATEWAY@", &cfg.gateway().to_string())
        .replace("@PID_FILE@", &p(files.pid()))
        .replace("@LEASE_FILE@", &p(files.leases()))
        .replace("@DHCP_HOSTS_FILE@", &p(files.dhcp_hosts()))
        .replace("@HOSTS_FILE@", &p(files.hosts()))
        .replace("@SERVERS_FILE@", &p(files.servers()))
        .replace("@LOG_FILE@", &p(files.log()))
}

/// Who dnsmasq drops to after binding its sockets, and where the files it re-reads as that user
/// live. It re-reads the static leases, names and upstream servers at start and on SIGHUP, after
/// the drop, so that user must be able to reach them.
///
/// - Root drops it to `nobody`/`nogroup`. When every directory down to the network's is
///   enterable by others (netd's state), the files stay there. When it is private (root's
///   own state, /root/... or a 0700 temporary directory), they go to a directory of their own
///   under /run that `nobody` can enter ([`make_public_dir`]): made for this state, recorded
///   in `owned.json`, removed by `down` and `prune`. Once recorded it is used until then.
/// - Anyone else keeps running it as themselves (they cannot switch anyway).
///
/// Makes that directory when it is needed: call it after the refusals (see
/// [`check_public_dir`]) and before the files are written.
pub fn run_as(files: &NetFiles) -> Result<(String, String)> {
    let me = current_user();
    if !nix::unistd::Uid::effective().is_root() {
        let group = nix::unistd::Group::from_gid(nix::unistd::getegid())
            .ok()
            .flatten()
            .map(|g| g.name)
            .unwrap_or_else(|| me.clone());
        return Ok((me, group));
    }
    if wants_public_dir(files, &Owned::load(files)?) {
        make_public_dir(files)?;
    }
    let group = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .and_then(|u| nix::unistd::Group::from_gid(u.gid).ok().flatten())
        .map(|g| g.name)
        .unwrap_or_else(|| "nogroup".into());
    Ok(("nobody".into(), group))
}

/// Root keeps dnsmasq's re-read files under /run: the state's own directory is private, or an
/// earlier `up` already put them there.
fn wants_public_dir(files: &NetFiles, owned: &Owned) -> bool {
    nix::unistd::Uid::effective().is_root()
        && (owned.dnsmasq_dir.is_some() || !enterable_by_others(&files.dir))
}

/// `path` is a directory this process could have made: a real directory (not a symlink),
/// owned by us, writable by nobody else.
fn is_ours(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| {
        m.file_type().is_dir()
            && m.uid() == nix::unistd::geteuid().as_raw()
            && m.mode() & 0o022 == 0
    })
}

/// The directory under /run this state recorded for dnsmasq's re-read files, if it is there
/// and still ours (a symlink or someone else's directory at that path is never written to).
pub fn recorded_public_dir(files: &NetFiles) -> Option<PathBuf> {
    Owned::load(files).ok()?.dnsmasq_dir.filter(|d| is_ours(d))
}

/// Why the directory for dnsmasq's re-read files cannot be used: something is at its path that
/// this state did not make (or no longer looks like what it made).
fn public_dir_problem(owned: &Owned, path: &Path) -> Option<Error> {
    let recorded = owned.dnsmasq_dir.as_deref() == Some(path);
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Ok(_) if recorded && is_ours(path) => None,
        Ok(m) => {
            let what = if m.file_type().is_symlink() {
                "a symlink"
            } else if !m.is_dir() {
                "not a directory"
            } else if recorded {
                "a directory writable by others or not root's"
            } else {
                "a directory this state did not make"
            };
            Some(Error::network(
                format!(
                    "{} exists and is {what}; boma-qvm keeps the files its dnsmasq re-reads \
                     as nobody there and does not adopt it",
                    show(path)
                ),
                format!(
                    "look at it; if it is a leftover of boma-qvm (another state of this \
                     directory, or a crash before an older version recorded it), remove it \
                     (`rm -r {}`)",
                    path.display()
                ),
            ))
        }
        Err(e) => Some(Error::Io {
            context: format!("looking at {}", show(path)),
            source: e,
        }),
    }
}

/// Refuse, before `up` makes anything, a path for dnsmasq's re-read files that is taken. A
/// network directory that does not exist yet counts as private here (the path is checked even
/// if `up` then finds it need not use it).
pub fn check_public_dir(files: &NetFiles, owned: &Owned) -> Result<()> {
    if !wants_public_dir(files, owned) {
        return Ok(());
    }
    let path = owned
        .dnsmasq_dir
        .clone()
        .unwrap_or_else(|| files.public_dir());
    public_dir_problem(owned, &path).map_or(Ok(()), Err)
}

/// Make (or find again) this state's directory for dnsmasq's re-read files: mode 0755, root's.
/// Recorded (owned.json written) before it is made, so a crash in between leaves it named for
/// `prune`, and unrecorded again when it cannot be made; a directory already at the path that
/// this state did not record is refused, never adopted.
///
/// Its files are VM names, MACs and addresses and the upstream DNS servers: not secrets, and
/// readable by everyone so that dnsmasq can re-read them as `nobody`.
pub fn make_public_dir(files: &NetFiles) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let (path, was_recorded) = Owned::update(files, |o| {
        let path = o.dnsmasq_dir.clone().unwrap_or_else(|| files.public_dir());
        match public_dir_problem(o, &path) {
            Some(e) => Err(e),
            None => Ok((path.clone(), o.dnsmasq_dir.replace(path).is_some())),
        }
    })??;
    let made = match std::fs::DirBuilder::new().mode(0o755).create(&path) {
        // Recorded and ours (checked above): found again.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && is_ours(&path) => Ok(()),
        other => other
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))),
    };
    if let Err(e) = made {
        if !was_recorded {
            Owned::update(files, |o| o.dnsmasq_dir = None)?;
        }
        return Err(Error::Io {
            context: format!("creating {}", show(&path)),
            source: e,
        });
    }
    Ok(path)
}

/// Remove the directory `owned` recorded for dnsmasq's re-read files (dnsmasq must be stopped):
/// its files, then the directory itself, only if it still is ours. Returns what was removed;
/// `Err` when it is ours but could not be removed (something else was put in it).
pub fn remove_public_dir(owned: &Owned) -> Result<Option<String>> {
    let Some(dir) = &owned.dnsmasq_dir else {
        return Ok(None);
    };
    if !is_ours(dir) {
        if std::fs::symlink_metadata(dir).is_ok() {
            tracing::warn!(
                "left {} alone: it is no longer the directory this state made",
                show(dir)
            );
        }
        return Ok(None);
    }
    for name in [DHCP_HOSTS, HOSTS, SERVERS] {
        let f = dir.join(name);
        for p in [crate::paths::atomic_tmp(&f), f] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::Io {
                        context: format!("removing {}", show(&p)),
                        source: e,
                    });
                }
                _ => {}
            }
        }
    }
    std::fs::remove_dir(dir).map_err(|e| Error::Io {
        context: format!(
            "removing {} (it holds files boma-qvm did not put there)",
            show(dir)
        ),
        source: e,
    })?;
    Ok(Some(format!("directory {}", dir.display())))
}

/// Every directory from / down to `dir` has the execute bit for others.
pub fn enterable_by_others(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    dir.ancestors()
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.mode() & 0o001 != 0))
}

/// Name of the effective user.
pub fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "root".to_string())
}

/// Nameservers of a resolv.conf text.
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            rest.split_whitespace()
                .next()?
                .split('%')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Upstream servers: the configured ones, else the host's /etc/resolv.conf.
pub fn upstream_servers(cfg: &NetConfig) -> Vec<IpAddr> {
    match &cfg.upstream_dns {
        Some(list) => list.clone(),
        None => parse_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
    }
}

/// Write the `servers-file`: the upstream servers, or none (egress off: local answers only).
pub fn write_servers(files: &NetFiles, servers: &[IpAddr]) -> Result<()> {
    let mut text =
        String::from("# generated by boma-qvm: upstream DNS, empty while VM egress is off\n");
    for s in servers {
        text.push_str(&format!("server={s}\n"));
    }
    // 0644 whatever the umask: dnsmasq re-reads it as `nobody` (not a secret).
    write_atomic_mode(&files.servers(), &text, 0o644)
}

/// The pid of OUR dnsmasq: the pid file's process, if it is alive and its command line is
/// `dnsmasq --conf-file=<our config>`. A stale or foreign pid gives `None`.
pub fn running_pid(files: &NetFiles) -> Option<Pid> {
    let pid: i32 = std::fs::read_to_string(files.pid())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if pid <= 1 {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into())
        .collect();
    let ours = format!("--conf-file={}", files.dnsmasq_conf().display());
    let is_dnsmasq = args
        .first()
        .is_some_and(|a| a.rsplit('/').next() == Some("dnsmasq"));
    (is_dnsmasq && args.contains(&ours)).then_some(Pid::from_raw(pid))
}

/// Start dnsmasq with our config; it daemonizes after its own startup checks and we wait for
/// its pid file. Errors carry dnsmasq's own message.
pub fn start(files: &NetFiles) -> Result<Pid> {
    let conf = format!("--conf-file={}", files.dnsmasq_conf().display());
    let _ = std::fs::remove_file(files.pid());
    let out = tools::output("dnsmasq", &[&conf], None)?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let fix = match out.status.code() {
            Some(2) => {
                "another DNS/DHCP server holds port 53 or 67 on the bridge address \
                        (e.g. a system dnsmasq bound to all interfaces); stop it or bind it to its own interfaces"
            }
            _ => "see the message above and the rendered config",
        };
        return Err(Error::network(
            format!(
                "dnsmasq did not start ({}; config {}): {msg}",
                out.status,
                show(&files.dnsmasq_conf())
            ),
            fix,
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = running_pid(files) {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            return Err(Error::network(
                format!(
                    "dnsmasq started but no live process behind {}",
                    show(&files.pid())
                ),
                format!("look at {}", show(&files.log())),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ask our dnsmasq to re-read dhcp-hostsfile, addn-hosts and the servers file.
/// Does nothing when it is not running (the next `up` starts it with the current files).
pub fn reload(files: &NetFiles) -> Result<bool> {
    let Some(pid) = running_pid(files) else {
        return Ok(false);
    };
    kill(pid, Signal::SIGHUP).map_err(|e| {
        Error::network(
            format!("SIGHUP to dnsmasq {pid}: {e}"),
            "run `boma-qvm net up`",
        )
    })?;
    Ok(true)
}

/// Stop our dnsmasq (SIGTERM, then SIGKILL after 5 s). Returns whether one was running.
pub fn stop(files: &NetFiles) -> Result<bool> {
    let Some(pid) = running_pid(files) else {
        let _ = std::fs::remove_file(files.pid());
        return Ok(false);
    };
    let _ = kill(pid, Signal::SIGTERM);
    // dnsmasq daemonized, so it is not our child: nothing to reap, poll /proc instead.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !is_zombie_or_gone(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !is_zombie_or_gone(pid) {
        let _ = kill(pid, Signal::SIGKILL);
    }
    let _ = std::fs::remove_file(files.pid());
    Ok(true)
}

fn is_zombie_or_gone(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_every_placeholder_and_binds_to_the_bridge() {
        let files = NetFiles {
            dir: "/s/net".into(),
        };
        let text = render(&NetConfig::default(), &files, "nobody", "nogroup");
        assert!(!text.contains('@'), "unfilled placeholder:\n{text}");
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        for line in [
            "interface=boma-qvm0",
            "bind-interfaces",
            "except-interface=lo",
            "dhcp-range=192.168.231.0,static,255.255.255.0,12h",
            "dhcp-option=option:router,192.168.231.1",
            "dhcp-hostsfile=/s/net/dhcp-hosts",
            "addn-hosts=/s/net/hosts",
            "dhcp-leasefile=/s/net/dnsmasq.leases",
            "pid-file=/s/net/dnsmasq.pid",
            "servers-file=/s/net/servers.conf",
            "no-resolv",
            "user=nobody",
            "group=nogroup",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "missing `{line}` in:\n{body}"
            );
        }
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# x\nnameserver 127.0.0.53\nsearch lan\nnameserver fe80::1%eth0\nnameserver   9.9.9.9 \nnameserverx 1.1.1.1\n";
        let got: Vec<String> = parse_resolv_conf(text)
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(got, ["127.0.0.53", "fe80::1", "9.9.9.9"]);
    }

    #[test]
    fn stale_or_foreign_pid_file_is_not_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let files = NetFiles {
            dir: tmp.path().to_path_buf(),
        };
        assert_eq!(running_pid(&files), None);
        // Our own test process is alive but is not our dnsmasq.
        std::fs::write(files.pid(), std::process::id().to_string()).unwrap();
        assert_eq!(running_pid(&files), None);
        std::fs::write(files.pid(), "garbage").unwrap();
        assert_eq!(running_pid(&files), None);
    }
}
