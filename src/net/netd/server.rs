//! The privileged side: `boma-qvm netd --socket PATH --state-dir DIR`, as root.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{UnixListener, UnixStream};

use super::proto::{Answer, MAX_LINE, Reply, Request};
use crate::error::{IoContext, WireError, show};
use crate::net::{NetConfig, Network, VmNet, lease};
use crate::paths::Dirs;
use crate::{Error, Result};

/// How netd runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    /// netd's own state: its network's files under `<state_dir>/net`.
    pub state_dir: PathBuf,
    /// The group that may use the socket (mode 0660); root only when it does not exist.
    pub group: String,
    /// The one network netd runs (its bridge and subnet; clients must ask for these).
    pub config: NetConfig,
}

pub use crate::net::confine::Peer;

struct Netd {
    opts: Options,
    dirs: Dirs,
    /// One request at a time changes the network.
    lock: tokio::sync::Mutex<()>,
}

/// Run netd until SIGTERM or SIGINT. Root only.
pub fn serve(opts: Options) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(Error::input(
            "boma-qvm netd runs as root (it holds CAP_NET_ADMIN for everyone else)",
            "start it as root: `systemctl start boma-qvm-netd`, or `sudo boma-qvm netd`",
        ));
    }
    opts.config.validate()?;
    // netd's files are read by dnsmasq after it drops to nobody, and by nobody else secret.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(opts))
}

async fn run(opts: Options) -> Result<()> {
    let dirs = Dirs {
        state: opts.state_dir.clone(),
        cache: opts.state_dir.join("cache"),
        runs: opts.state_dir.join("runs"),
        origins: Default::default(),
    };
    std::fs::create_dir_all(dirs.net()).ctx(|| format!("creating {}", show(&dirs.net())))?;
    for d in [&dirs.state, &dirs.net()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .ctx(|| format!("setting the mode of {}", show(d)))?;
    }
    let listener = listen(&opts)?;
    tracing::info!(
        "boma-qvm netd listening on {} (group {}), network {} {} , state {}",
        show(&opts.socket),
        opts.group,
        opts.config.bridge,
        opts.config.subnet,
        show(&opts.state_dir)
    );
    let netd = Arc::new(Netd {
        opts,
        dirs,
        lock: tokio::sync::Mutex::new(()),
    });
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ctx(|| "SIGTERM handler".into())?;
    let mut int = signal(SignalKind::interrupt()).ctx(|| "SIGINT handler".into())?;
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let n = netd.clone();
                    tokio::spawn(async move { n.connection(stream).await });
                }
                Err(e) => tracing::warn!("accept: {e}"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = std::fs::remove_file(&netd.opts.socket);
    let _guard = netd.lock.lock().await;
    let network = netd.network();
    if network.vms()?.is_empty() {
        let removed = network.down().await?;
        tracing::info!(
            "netd stopping; no VM left, network down ({})",
            removed.join(", ")
        );
    } else {
        tracing::info!("netd stopping; VMs are registered, the network stays up for them");
    }
    Ok(())
}

/// Bind the socket: parent made if missing, a stale socket replaced, a live netd refused;
/// mode 0660, group `opts.group`.
fn listen(opts: &Options) -> Result<UnixListener> {
    let path = &opts.socket;
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", show(dir)))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .ctx(|| format!("setting the mode of {}", show(dir)))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::AlreadyExists {
                what: format!("a boma-qvm netd listening on {}", show(path)),
                fix: "use it, or stop it first (`systemctl stop boma-qvm-netd`)".into(),
            });
        }
        std::fs::remove_file(path).ctx(|| format!("removing the stale socket {}", show(path)))?;
    }
    let listener = UnixListener::bind(path).ctx(|| format!("binding {}", show(path)))?;
    let gid = nix::unistd::Group::from_name(&opts.group)
        .ok()
        .flatten()
        .map(|g| g.gid);
    if gid.is_none() {
        tracing::warn!(
            "group {} does not exist: only root can use {} (the integration_test role creates the group)",
            opts.group,
            show(path)
        );
    }
    nix::unistd::chown(path, None, gid).map_err(|e| Error::Io {
        context: format!("chown {}", show(path)),
        source: e.into(),
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .ctx(|| format!("setting the mode of {}", show(path)))?;
    Ok(listener)
}

/// Refusal of a request about another uid's VM.
fn not_yours(peer: Peer, vm: &VmNet) -> Error {
    Error::network(
        format!(
            "VM {} on netd's network belongs to uid {}, not to uid {} who asked",
            vm.name,
            vm.owner
                .map(|u| u.to_string())
                .unwrap_or_else(|| "root".into()),
            peer.uid
        ),
        "act on your own VMs (root may act on all); a VM name can be registered by one user at a time: pick another host name",
    )
}

impl Netd {
    fn network(&self) -> Network {
        Network::attach(&self.dirs, &self.opts.config)
    }

    fn find(&self, name: &str) -> Result<Option<VmNet>> {
        Ok(self.network().vms()?.into_iter().find(|v| v.name == name))
    }

    /// The caller's VM `name`, or why not.
    fn own(&self, peer: Peer, name: &str) -> Result<VmNet> {
        let vm = self.find(name)?.ok_or_else(|| {
            Error::not_found(
                format!("VM {name} on netd's network"),
                "it is not registered: bring it up again (`boma-qvm start VM` or `up`)",
            )
        })?;
        if peer.uid == 0 || vm.owner == Some(peer.uid) {
            Ok(vm)
        } else {
            Err(not_yours(peer, &vm))
        }
    }

    async fn connection(self: Arc<Self>, stream: UnixStream) {
        let peer = match stream.peer_cred() {
            Ok(c) => Peer {
                uid: c.uid(),
                pid: c.pid().unwrap_or(0),
            },
            Err(e) => {
                tracing::warn!("no peer credentials: {e}");
                return;
            }
        };
        let mut held = Held::default();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        loop {
            line.clear();
            let n = match (&mut reader)
                .take(MAX_LINE as u64)
                .read_line(&mut line)
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!("uid {} pid {}: read: {e}", peer.uid, peer.pid);
                    break;
                }
            };
            if n == 0 {
                break;
            }
            let req: std::result::Result<Request, _> = serde_json::from_str(line.trim_end());
            let (answer, fd): (Answer, Option<OwnedFd>) = match req {
                Err(e) => (
                    Err(WireError::from(&Error::input(
                        format!("netd cannot read the request: {e}"),
                        "use the boma-qvm CLI of the same version as netd",
                    ))),
                    None,
                ),
                Ok(req) => {
                    let what = format!("{req:?}");
                    match self.handle(req, peer, &mut held).await {
                        Ok((reply, fd)) => {
                            tracing::info!("uid {} pid {}: {what}: ok", peer.uid, peer.pid);
                            (Ok(reply), fd)
                        }
                        Err(e) => {
                            tracing::info!(
                                "uid {} pid {}: {what}: refused: {}",
                                peer.uid,
                                peer.pid,
                                e.to_string().replace("\n  ", "; ")
                            );
                            (Err(WireError::from(&e)), None)
                        }
                    }
                }
            };
            let mut text = serde_json::to_string(&answer).expect("an answer serializes");
            text.push('\n');
            if let Err(e) = send(reader.get_mut(), text.as_bytes(), fd.as_ref()).await {
                tracing::debug!("uid {} pid {}: write: {e}", peer.uid, peer.pid);
                break;
            }
        }
        self.release(held).await;
    }

    async fn handle(
        &self,
        req: Request,
        peer: Peer,
        held: &mut Held,
    ) -> Result<(Reply, Option<OwnedFd>)> {
        let _guard = self.lock.lock().await;
        let network = self.network();
        let reply = match req {
            Request::Up { config } => {
                if let Some(c) = &config {
                    self.same_network(c)?;
                }
                Network::up(&self.dirs, &self.opts.config).await?;
                Reply::Net {
                    config: self.opts.config.clone(),
                }
            }
            Request::Register {
                vm,
                dns_names,
                egress,
                state,
            } => {
                if let Some(existing) = self.find(&vm)?
                    && peer.uid != 0
                    && existing.owner != Some(peer.uid)
                {
                    return Err(not_yours(peer, &existing));
                }
                let network = Network::up(&self.dirs, &self.opts.config).await?;
                let mut v = network.vm_net(&vm, dns_names, egress)?;
                v.owner = Some(peer.uid);
                v.state = Some(state);
                network.register_vm(&v)?;
                Reply::Vm { vm: v, lease: None }
            }
            Request::Unregister { vm } => match self.find(&vm)? {
                None => Reply::Unregistered {
                    was: false,
                    network_down: self.down_if_empty(&network).await?,
                },
                Some(_) => {
                    self.own(peer, &vm)?;
                    network.unregister_vm(&vm)?;
                    Reply::Unregistered {
                        was: true,
                        network_down: self.down_if_empty(&network).await?,
                    }
                }
            },
            Request::Vm { vm } => {
                let v = self.own(peer, &vm)?;
                let text = std::fs::read_to_string(network.lease_file()).unwrap_or_default();
                let lease = lease::newest_lease(&text, &v.mac).map(|l| l.ip);
                Reply::Vm { vm: v, lease }
            }
            Request::Tap { vm } => {
                self.own(peer, &vm)?;
                let fd = network.open_tap(&vm).await?;
                return Ok((
                    Reply::Tap {
                        name: crate::net::tap_name_for(&vm),
                    },
                    Some(fd),
                ));
            }
            Request::Egress { vm, on } => {
                let v = self.own(peer, &vm)?;
                network.set_egress(v.ip, on)?;
                Reply::Done
            }
            Request::Status => {
                let mut status = network.status().await?;
                status.via = Some(format!("netd at {}", show(&self.opts.socket)));
                Reply::Status { status }
            }
            Request::Down => {
                let vms = network.vms()?;
                if !vms.is_empty() {
                    let list: Vec<String> = vms
                        .iter()
                        .map(|v| match v.owner {
                            Some(u) => format!("{} (uid {u})", v.name),
                            None => v.name.clone(),
                        })
                        .collect();
                    return Err(Error::input(
                        format!("VMs are still on netd's network: {}", list.join(", ")),
                        "`boma-qvm down` them first; the network goes down by itself once the last VM is gone",
                    ));
                }
                Reply::Removed {
                    removed: network.down().await?,
                }
            }
            Request::Prune { state } => {
                let mut removed = Vec::new();
                for v in network.vms()? {
                    if v.owner == Some(peer.uid) && v.state.as_deref() == Some(state.as_path()) {
                        network.unregister_vm(&v.name)?;
                        removed.push(format!("VM network record {}", v.name));
                    }
                }
                if self.down_if_empty(&network).await? {
                    removed.push("the network (no VM left on it)".into());
                }
                Reply::Removed { removed }
            }
            Request::Confine { child } => {
                let c = super::super::confine::grant(&network, peer, child, held).await?;
                Reply::Confined { confinement: c }
            }
        };
        Ok((reply, None))
    }

    fn same_network(&self, asked: &NetConfig) -> Result<()> {
        let ours = &self.opts.config;
        if asked.bridge != ours.bridge || asked.subnet != ours.subnet {
            return Err(Error::input(
                format!(
                    "netd runs the network {} {}, not {} {}",
                    ours.bridge, ours.subnet, asked.bridge, asked.subnet
                ),
                format!(
                    "leave --bridge/--subnet out (or give --bridge {} --subnet {}); netd's network is set by its own flags",
                    ours.bridge, ours.subnet
                ),
            ));
        }
        Ok(())
    }

    async fn down_if_empty(&self, network: &Network) -> Result<bool> {
        if network.vms()?.is_empty() && network.status().await?.bridge.is_some() {
            network.clone().down().await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// A connection closed: give back what it held (confinement addresses and veths).
    async fn release(&self, held: Held) {
        if held.is_empty() {
            return;
        }
        let _guard = self.lock.lock().await;
        if let Err(e) = super::super::confine::release(&self.network(), held).await {
            tracing::warn!("releasing a confinement: {e}");
        }
    }
}

/// What one connection holds until it closes.
pub type Held = crate::net::confine::Held;

/// Write `bytes`, with `fd` as SCM_RIGHTS on the first message when given.
async fn send(stream: &mut UnixStream, bytes: &[u8], fd: Option<&OwnedFd>) -> std::io::Result<()> {
    let mut rest = bytes;
    if let Some(fd) = fd {
        let raw = [fd.as_raw_fd()];
        loop {
            stream.writable().await?;
            let r = stream.try_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(rest)],
                    &[ControlMessage::ScmRights(&raw)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match r {
                Ok(n) => {
                    rest = &rest[n..];
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
    stream.write_all(rest).await
}

/// Where netd's state is by default, for messages.
pub fn default_state_dir() -> &'static Path {
    Path::new(super::DEFAULT_STATE_DIR)
}
