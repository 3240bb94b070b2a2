//! Confinement of the control node's side of a cycle: every process a cycle starts for Ansible
//! (ansible-playbook, ansible-inventory, ansible, their ssh, lookups and tasks delegated to
//! localhost) runs in a network namespace of its own that reaches only the VM network and
//! loopback. No LAN, no mesh, no internet, not even the host itself.
//!
//! `boma-qvm __confined [--netd SOCKET] [--loopback-only] -- CMD ARGS...` (same binary):
//!
//! 1. forks; the child unshares a user and a network namespace, maps the caller's uid and gid
//!    to themselves (files keep their owner; other uids show as nobody) and waits;
//! 2. the parent asks netd (`Confine { child }`; root without netd does it itself) for a veth
//!    whose host end is on our bridge and whose other end is moved into the child's namespace,
//!    with an address from the confinement range (`NetConfig::confine_range`, outside the VMs'
//!    range; our nft table drops anything from it that is not for the VM subnet);
//! 3. the child brings up lo and the veth with that address and no route beyond the VM subnet,
//!    drops every capability (bounding set cleared, no_new_privs), and execs CMD;
//! 4. the parent waits, passes the exit status on, and gives the address back (netd does so
//!    when the parent's connection closes, also when it is killed).
//!
//! `--loopback-only`: no veth at all (reading the real inventory needs no network).

use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rtnetlink::{LinkUnspec, LinkVeth};
use serde::{Deserialize, Serialize};

use super::bridge;
use super::netd::Client;
use super::netd::proto::{Confinement, Reply, Request};
use super::network::Network;
use super::owned::{LinkRecord, Owned};
use super::rtnl::Rtnl;
use crate::error::show;
use crate::machine::procs;
use crate::paths::Dirs;
use crate::{Error, Result};

/// Who asks for a confinement (netd: SO_PEERCRED; direct: this process).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: u32,
    pub pid: i32,
}

/// What one netd connection (or one direct `__confined`) holds until it ends.
#[derive(Debug, Default)]
pub struct Held {
    pub veths: Vec<LinkRecord>,
}

impl Held {
    pub fn is_empty(&self) -> bool {
        self.veths.is_empty()
    }
}

fn ns_inode(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

fn refuse(problem: String) -> Error {
    Error::network(
        problem,
        "confinement is asked for by `boma-qvm __confined` for the child it just made; run the cycle, not this by hand",
    )
}

/// Give `child` (a child of `peer`, of the same uid, in a network namespace of its own) a veth
/// on `network`'s bridge with a free address of the confinement range; recorded in the
/// network's state and in `held`.
pub async fn grant(
    network: &Network,
    peer: Peer,
    child: i32,
    held: &mut Held,
) -> Result<Confinement> {
    if procs::ppid(child) != Some(peer.pid) {
        return Err(refuse(format!(
            "pid {child} is not a child of the asking process (pid {})",
            peer.pid
        )));
    }
    if peer.uid != 0 && procs::uid(child) != Some(peer.uid) {
        return Err(refuse(format!(
            "pid {child} does not run as uid {} who asked",
            peer.uid
        )));
    }
    let theirs = ns_inode(&format!("/proc/{child}/ns/net"));
    if theirs.is_none() || theirs == ns_inode("/proc/thread-self/ns/net") {
        return Err(refuse(format!(
            "pid {child} is in the host's network namespace, not one of its own"
        )));
    }
    let cfg = network.config().clone();
    let files = network.files().clone();
    let owned = Owned::load(&files)?;
    let rtnl = Rtnl::connect()?;
    let br = match rtnl.link(&cfg.bridge).await? {
        Some(l) if bridge::is_recorded(&l, owned.bridge.as_ref()) => l,
        _ => {
            return Err(Error::network(
                format!("the VM network (bridge {}) is not up", cfg.bridge),
                "confinement puts the run on the VM network: bring a VM up first (the cycle does)",
            ));
        }
    };
    // Addresses in use: recorded veths whose link is still there.
    let links = rtnl.links().await?;
    let live = |r: &LinkRecord| {
        links
            .iter()
            .any(|l| l.name == r.name && l.index == r.ifindex)
    };
    let used: Vec<Ipv4Addr> = owned
        .veths
        .iter()
        .filter(|r| live(r))
        .filter_map(|r| r.owner.as_deref()?.parse().ok())
        .collect();
    let (first, last) = cfg.confine_range();
    let address = (u32::from(first)..=u32::from(last))
        .map(Ipv4Addr::from)
        .find(|a| !used.contains(a))
        .ok_or_else(|| {
            Error::network(
                format!(
                    "all {} confinement addresses ({first}-{last}) are in use",
                    u32::from(last) - u32::from(first) + 1
                ),
                "wait for the other runs on this network to finish",
            )
        })?;
    let tag = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(format!("{address}-{child}-{}", peer.pid).as_bytes());
        hex::encode(&d[..4])
    };
    let host_end = format!("bqc-{tag}");
    let inner = format!("bqv-{tag}");
    rtnl.handle
        .link()
        .add(LinkVeth::new(&host_end, &inner).build())
        .execute()
        .await
        .map_err(|e| {
            Error::network(
                format!("creating the confinement veth {host_end}: {e}"),
                "check `ip link` for a leftover of that name; `boma-qvm prune` removes recorded ones",
            )
        })?;
    let host = rtnl.link(&host_end).await?.ok_or_else(|| {
        Error::network(
            format!("veth {host_end} vanished right after creation"),
            "try again",
        )
    })?;
    let rec = LinkRecord {
        name: host_end.clone(),
        ifindex: host.index,
        owner: Some(address.to_string()),
    };
    Owned::update(&files, |o| {
        o.veths.retain(|v| live(v) && v.name != rec.name);
        o.veths.push(rec.clone());
    })?;
    held.veths.push(rec);
    let moved = async {
        rtnl.enslave_up(host.index, br.index).await?;
        let peer_link = rtnl
            .link(&inner)
            .await?
            .ok_or_else(|| Error::network(format!("veth end {inner} vanished"), "try again"))?;
        let msg = LinkUnspec::new_with_index(peer_link.index)
            .setns_by_pid(child as u32)
            .build();
        rtnl.handle.link().set(msg).execute().await.map_err(|e| {
            Error::network(
                format!("moving {inner} into pid {child}'s network namespace: {e}"),
                "the confined process may have exited; try again",
            )
        })
    }
    .await;
    moved?;
    tracing::info!(
        "confined pid {child} (uid {}): {inner} {address}/{} on bridge {} (host end {host_end})",
        peer.uid,
        cfg.subnet.prefix(),
        cfg.bridge
    );
    Ok(Confinement {
        ifname: inner,
        address,
        prefix: cfg.subnet.prefix(),
        host_end,
    })
}

/// Give back what `held` holds: delete the veths (both ends go) still there as recorded.
pub async fn release(network: &Network, held: Held) -> Result<()> {
    let rtnl = Rtnl::connect()?;
    // Forget every veth that is gone, also when another one could not be deleted: the record
    // names exactly what is left for `prune`.
    let mut gone = Vec::new();
    let mut first_err = None;
    for rec in &held.veths {
        match rtnl.delete_recorded(rec).await {
            Ok(_) => gone.push(rec.name.as_str()),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Owned::update(network.files(), |o| {
        o.veths.retain(|v| !gone.contains(&v.name.as_str()))
    })?;
    first_err.map_or(Ok(()), Err)
}

/// What the parent tells the child: where it is on the VM network (`None`: loopback only), or
/// why there is no confinement (the child then exits without running anything).
#[derive(Debug, Serialize, Deserialize)]
enum Go {
    Run(Option<Confinement>),
    Abort(String),
}

/// How `__confined` was asked to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub dirs: Dirs,
    /// netd's socket; `None`: this process builds the veth itself (root).
    pub netd: Option<PathBuf>,
    /// No veth at all: loopback only.
    pub loopback_only: bool,
    pub argv: Vec<OsString>,
}

/// `boma-qvm __confined`: run `opts.argv` confined; its exit status (128 + signal when killed).
/// Must be called before any thread is started (it forks, and the child unshares a user
/// namespace, which a multi-threaded process cannot).
pub fn run(opts: Options) -> Result<i32> {
    let Some(program) = opts.argv.first().cloned() else {
        return Err(Error::input(
            "`__confined` needs a command: `boma-qvm __confined -- CMD ARGS...`",
            "give the command after `--`",
        ));
    };
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    // SAFETY: no other thread exists yet (see above); the child only makes syscalls, then a
    // fresh current-thread runtime for netlink, then execs.
    match unsafe { nix::unistd::fork() }.map_err(|e| io_err("fork", e))? {
        nix::unistd::ForkResult::Child => {
            drop(ready_r);
            drop(go_w);
            let code = match child(uid.as_raw(), gid.as_raw(), ready_w, go_r, &opts.argv) {
                Ok(never) => match never {},
                Err(e) => {
                    eprintln!("error: confined {}: {e}", Path::new(&program).display());
                    e.exit_code().max(1)
                }
            };
            std::process::exit(code)
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(ready_w);
            drop(go_r);
            parent(&opts, child, ready_r, go_w)
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io_err("pipe", e))
}

fn io_err(what: &str, e: nix::errno::Errno) -> Error {
    Error::Io {
        context: what.to_string(),
        source: e.into(),
    }
}

static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let c = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if c > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(c, sig) };
    }
}

fn parent(opts: &Options, child: nix::unistd::Pid, ready_r: OwnedFd, go_w: OwnedFd) -> Result<i32> {
    CHILD.store(child.as_raw(), std::sync::atomic::Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: `forward` only calls kill.
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
    let mut ready = [0u8; 1];
    let got = std::fs::File::from(ready_r).read(&mut ready).unwrap_or(0);
    let mut go = std::fs::File::from(go_w);
    let mut session = None;
    let mut direct: Option<(tokio::runtime::Runtime, Network, Held)> = None;
    let granted: Result<Option<Confinement>> = if got == 0 {
        Err(Error::network(
            "the confined child could not set up its namespaces",
            "see its message above; unprivileged user namespaces must be allowed (sysctl kernel.unprivileged_userns_clone=1)",
        ))
    } else if opts.loopback_only {
        Ok(None)
    } else {
        let me = Peer {
            uid: nix::unistd::getuid().as_raw(),
            pid: nix::unistd::getpid().as_raw(),
        };
        match &opts.netd {
            Some(sock) => from_netd(sock, child.as_raw()).map(|(s, c)| {
                session = Some(s);
                Some(c)
            }),
            None => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                let network = Network::saved(&opts.dirs);
                let mut held = Held::default();
                let r = rt.block_on(grant(&network, me, child.as_raw(), &mut held));
                direct = Some((rt, network, held));
                r.map(Some)
            }
        }
    };
    let msg = match &granted {
        Ok(c) => Go::Run(c.clone()),
        Err(e) => Go::Abort(e.to_string()),
    };
    let _ = go.write_all(serde_json::to_string(&msg).expect("serializes").as_bytes());
    drop(go);
    let status = loop {
        match nix::sys::wait::waitpid(child, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    if let Some((rt, network, held)) = direct
        && let Err(e) = rt.block_on(release(&network, held))
    {
        eprintln!("warning: releasing the confinement: {e}");
    }
    drop(session);
    granted?;
    use nix::sys::wait::WaitStatus;
    Ok(match status.map_err(|e| io_err("waitpid", e))? {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 1,
    })
}

/// Ask netd for a confinement of `child`; the session holds it until it is dropped.
fn from_netd(sock: &Path, child: i32) -> Result<(super::netd::client::Session, Confinement)> {
    let mut s = Client::new(sock).session()?;
    match s.call(&Request::Confine { child })? {
        Reply::Confined { confinement } => Ok((s, confinement)),
        other => Err(Error::network(
            format!("netd answered {other:?} to a confinement request"),
            "check that netd is this version of boma-qvm",
        )),
    }
}

fn child(
    uid: u32,
    gid: u32,
    ready_w: OwnedFd,
    go_r: OwnedFd,
    argv: &[OsString],
) -> Result<std::convert::Infallible> {
    use nix::sched::{CloneFlags, unshare};
    // Die with the parent: it holds the confinement address.
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET).map_err(|e| {
        Error::network(
            format!("unshare(user + network namespace): {e}"),
            "this kernel must allow user namespaces for this user (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0)",
        )
    })?;
    let write = |p: &str, s: String| {
        std::fs::write(p, s).map_err(|e| Error::Io {
            context: format!("writing {p}"),
            source: e,
        })
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    std::fs::File::from(ready_w)
        .write_all(b"r")
        .map_err(|e| Error::Io {
            context: "telling the parent".into(),
            source: e,
        })?;
    let mut text = String::new();
    std::fs::File::from(go_r)
        .read_to_string(&mut text)
        .map_err(|e| Error::Io {
            context: "waiting for the parent".into(),
            source: e,
        })?;
    let go: Go = serde_json::from_str(&text)
        .map_err(|_| Error::network("the confining parent went away", "run the command again"))?;
    let conf = match go {
        Go::Run(c) => c,
        // The parent reports the error itself.
        Go::Abort(_) => std::process::exit(111),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(configure(conf.as_ref()))?;
    drop(rt);
    drop_capabilities();
    let c: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).expect("no NUL in argv"))
        .collect();
    let e = nix::unistd::execvp(&c[0], &c).unwrap_err();
    Err(Error::missing_tool(
        Path::new(&argv[0]).display().to_string(),
        format!("it could not be run ({e})"),
    ))
}

/// In the new namespace: lo up; the veth up with its address (the kernel adds the one route
/// this needs, to the VM subnet); nothing else.
async fn configure(c: Option<&Confinement>) -> Result<()> {
    let rtnl = Rtnl::connect()?;
    let lo = rtnl
        .link("lo")
        .await?
        .ok_or_else(|| Error::network("no lo in the new namespace", "report this as a bug"))?;
    rtnl.set_up(lo.index).await?;
    if let Some(c) = c {
        let l = rtnl.link(&c.ifname).await?.ok_or_else(|| {
            Error::network(
                format!("{} did not arrive in the confined namespace", c.ifname),
                "try again",
            )
        })?;
        // No default route: anything beyond the VM subnet is "Network is unreachable".
        rtnl.add_ipv4(l.index, c.address, c.prefix).await?;
        rtnl.set_up(l.index).await?;
    }
    Ok(())
}

/// Nothing the command execs gets a capability, even as uid 0 inside the namespace: the
/// bounding set is emptied and no_new_privs set (for a non-root uid, exec drops them anyway).
fn drop_capabilities() {
    for cap in 0..64 {
        // SAFETY: plain prctl; EINVAL past the last capability is ignored.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
}

/// Why a failed connection from a confined run failed, for the run's output: a confined
/// process reaches only the VM subnet and loopback.
pub const WHY: &str = "the control node's side of the run is confined (ADR-026): Ansible and everything it starts on the control node (delegate_to: localhost, local_action, lookups) reach only the VM network and loopback, so anything else is \"Network is unreachable\"";

/// Is `msg` what a confined process sees when it reaches beyond the VM network?
pub fn is_confinement_refusal(msg: &str) -> bool {
    let m = msg.to_lowercase();
    m.contains("network is unreachable") || m.contains("no route to host")
}

/// Where a confined run is recorded for messages: the network's state.
pub fn describe(dirs: &Dirs, netd: Option<&Path>) -> String {
    match netd {
        Some(s) => format!("netd at {}", show(s)),
        None => format!("the network of {}", show(&dirs.net())),
    }
}
