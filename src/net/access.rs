//! How this process reaches the VM network: through netd (the privileged daemon; always for
//! a user who is not root, and for root too whenever a netd socket exists or is configured),
//! or directly (root without netd: tests, CI, `BOMA_QVM_NETD_SOCKET=none`).
//!
//! A VM records which one it was made with (`NicSpec::netd`), so its later operations (tap,
//! egress, address, teardown) go the same way whatever the environment says then.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::netd::{self, Client, Reply, Request, Setting};
use super::{Mac, NetConfig, NetStatus, Network, PruneReport, VmNet};
use crate::error::show;
use crate::paths::Dirs;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub enum NetAccess {
    /// This process builds and changes the network itself (root).
    Direct { dirs: Dirs },
    /// netd does it.
    Netd { client: Client, state: PathBuf },
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The error for a user who is not root and has no netd to ask.
fn needs_netd(why: &str) -> Error {
    Error::network(
        format!("the VM network needs CAP_NET_ADMIN, which this user does not have, and {why}"),
        format!(
            "start boma-qvm netd (`systemctl start boma-qvm-netd`; the integration_test role \
             installs it) and join group {} (`usermod -aG {0} $USER`, then log in again); or \
             point {} at a running netd's socket",
            netd::DEFAULT_GROUP,
            netd::SOCKET_VAR
        ),
    )
}

impl NetAccess {
    /// Decide from `BOMA_QVM_NETD_SOCKET` (see `netd::Setting`), the default socket's presence
    /// and whether this process is root.
    pub fn choose(dirs: &Dirs) -> Result<NetAccess> {
        let netd_at = |p: PathBuf| NetAccess::Netd {
            client: Client::new(p),
            state: dirs.state.clone(),
        };
        match netd::setting() {
            Setting::Socket(p) => Ok(netd_at(p)),
            Setting::Off if is_root() => Ok(NetAccess::Direct { dirs: dirs.clone() }),
            Setting::Off => Err(needs_netd(&format!(
                "{}=none turns netd off",
                netd::SOCKET_VAR
            ))),
            Setting::Auto if Path::new(netd::DEFAULT_SOCKET).exists() => {
                Ok(netd_at(netd::DEFAULT_SOCKET.into()))
            }
            Setting::Auto if is_root() => Ok(NetAccess::Direct { dirs: dirs.clone() }),
            Setting::Auto => Err(needs_netd(&format!(
                "no netd socket exists at {}",
                netd::DEFAULT_SOCKET
            ))),
        }
    }

    /// The way a VM was made (its NIC records netd's socket when netd made it).
    pub fn recorded(dirs: &Dirs, netd_socket: Option<&Path>) -> NetAccess {
        match netd_socket {
            Some(p) => NetAccess::Netd {
                client: Client::new(p),
                state: dirs.state.clone(),
            },
            None => NetAccess::Direct { dirs: dirs.clone() },
        }
    }

    /// netd's socket, when it is netd.
    pub fn socket(&self) -> Option<&Path> {
        match self {
            NetAccess::Netd { client, .. } => Some(&client.socket),
            NetAccess::Direct { .. } => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            NetAccess::Netd { client, .. } => format!("netd at {}", show(&client.socket)),
            NetAccess::Direct { dirs } => format!("directly (root), state {}", show(&dirs.net())),
        }
    }

    async fn call(&self, req: Request) -> Result<Reply> {
        let NetAccess::Netd { client, .. } = self else {
            unreachable!("only netd is called")
        };
        let client = client.clone();
        tokio::task::spawn_blocking(move || client.call(&req))
            .await
            .expect("netd call task")
    }

    /// Bring the network up with `cfg`; the config it really runs with (netd's own, which
    /// must have the same bridge and subnet).
    pub async fn up(&self, cfg: &NetConfig) -> Result<NetConfig> {
        self.up_with(Some(cfg)).await
    }

    /// Bring a VM's network back (`start`): this state's saved network on `bridge`, or
    /// whatever netd runs.
    pub async fn up_again(&self, bridge: &str) -> Result<NetConfig> {
        match self {
            NetAccess::Direct { dirs } => {
                let mut cfg = Network::saved_config(dirs);
                cfg.bridge = bridge.to_string();
                self.up_with(Some(&cfg)).await
            }
            NetAccess::Netd { .. } => self.up_with(None).await,
        }
    }

    async fn up_with(&self, cfg: Option<&NetConfig>) -> Result<NetConfig> {
        match self {
            NetAccess::Direct { dirs } => {
                let cfg = cfg.cloned().unwrap_or_else(|| Network::saved_config(dirs));
                Ok(Network::up(dirs, &cfg).await?.config().clone())
            }
            NetAccess::Netd { .. } => match self
                .call(Request::Up {
                    config: cfg.cloned(),
                })
                .await?
            {
                Reply::Net { config } => Ok(config),
                other => Err(unexpected(&other)),
            },
        }
    }

    /// Register VM `name` (static lease, DNS names, egress); its identity on the network.
    pub async fn register(
        &self,
        cfg: &NetConfig,
        name: &str,
        dns_names: Vec<String>,
        egress: bool,
    ) -> Result<VmNet> {
        match self {
            NetAccess::Direct { dirs } => {
                let n = Network::attach(dirs, cfg);
                let v = n.vm_net(name, dns_names, egress)?;
                n.register_vm(&v)?;
                Ok(v)
            }
            NetAccess::Netd { state, .. } => match self
                .call(Request::Register {
                    vm: name.into(),
                    dns_names,
                    egress,
                    state: state.clone(),
                })
                .await?
            {
                Reply::Vm { vm, .. } => Ok(vm),
                other => Err(unexpected(&other)),
            },
        }
    }

    /// VM `name`'s registration and its current lease (`Ok(None)`: not registered). Blocking
    /// and quick (a file read, or one netd request).
    pub fn vm(&self, name: &str) -> Result<Option<(VmNet, Option<Ipv4Addr>)>> {
        match self {
            NetAccess::Direct { dirs } => {
                let n = Network::saved(dirs);
                let Some(v) = n.vms()?.into_iter().find(|v| v.name == name) else {
                    return Ok(None);
                };
                let text = std::fs::read_to_string(n.lease_file()).unwrap_or_default();
                let lease = super::lease::newest_lease(&text, &v.mac).map(|l| l.ip);
                Ok(Some((v, lease)))
            }
            NetAccess::Netd { client, .. } => match client.call(&Request::Vm { vm: name.into() }) {
                Ok(Reply::Vm { vm, lease }) => Ok(Some((vm, lease))),
                Ok(other) => Err(unexpected(&other)),
                Err(Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// Wait until VM `name` (MAC `mac`) holds a DHCP lease; its address.
    pub async fn wait_lease(&self, name: &str, mac: &Mac, timeout: Duration) -> Result<Ipv4Addr> {
        if let NetAccess::Direct { dirs } = self {
            return super::wait_for_lease(&Network::saved(dirs).lease_file(), mac, timeout).await;
        }
        let start = Instant::now();
        loop {
            if let Some((_, Some(ip))) = self.vm(name)? {
                tracing::info!(
                    "DHCP lease {ip} for {mac} after {:.1}s",
                    start.elapsed().as_secs_f64()
                );
                return Ok(ip);
            }
            if start.elapsed() >= timeout {
                return Err(Error::timeout(
                    format!("a DHCP lease for {mac} ({})", self.describe()),
                    timeout.as_secs(),
                    "",
                ));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// A tap for VM `name` on the bridge, as an fd for QEMU.
    pub async fn tap(&self, cfg: &NetConfig, name: &str) -> Result<OwnedFd> {
        match self {
            NetAccess::Direct { dirs } => Network::attach(dirs, cfg).open_tap(name).await,
            NetAccess::Netd { client, .. } => {
                let client = client.clone();
                let req = Request::Tap { vm: name.into() };
                let (_, fd) = tokio::task::spawn_blocking(move || client.call_for_fd(&req))
                    .await
                    .expect("netd call task")?;
                Ok(fd)
            }
        }
    }

    /// Switch VM `name`'s egress.
    pub async fn set_egress(&self, name: &str, ip: Ipv4Addr, on: bool) -> Result<()> {
        match self {
            NetAccess::Direct { dirs } => Network::saved(dirs).set_egress(ip, on),
            NetAccess::Netd { .. } => self
                .call(Request::Egress {
                    vm: name.into(),
                    on,
                })
                .await
                .map(|_| ()),
        }
    }

    /// Unregister VM `name`; the network goes down once no VM is left on it. Returns whether
    /// it was registered.
    pub async fn release(&self, name: &str, had_nic: bool) -> Result<bool> {
        match self {
            NetAccess::Direct { dirs } => {
                let network = Network::saved(dirs);
                let registered = network.unregister_vm(name)?;
                if (had_nic || registered) && network.vms()?.is_empty() {
                    network.down().await?;
                }
                Ok(registered)
            }
            NetAccess::Netd { .. } => {
                match self.call(Request::Unregister { vm: name.into() }).await? {
                    Reply::Unregistered { was, .. } => Ok(was),
                    other => Err(unexpected(&other)),
                }
            }
        }
    }

    pub async fn status(&self) -> Result<NetStatus> {
        match self {
            NetAccess::Direct { dirs } => Network::saved(dirs).status().await,
            NetAccess::Netd { .. } => match self.call(Request::Status).await? {
                Reply::Status { status } => Ok(status),
                other => Err(unexpected(&other)),
            },
        }
    }

    /// `net down`: what was removed.
    pub async fn down(&self) -> Result<Vec<String>> {
        match self {
            NetAccess::Direct { dirs } => Network::saved(dirs).down().await,
            NetAccess::Netd { .. } => match self.call(Request::Down).await? {
                Reply::Removed { removed } => Ok(removed),
                other => Err(unexpected(&other)),
            },
        }
    }

    /// `prune`'s network part: this state's objects (direct), or this user's VMs of this
    /// state (netd).
    pub async fn prune(&self) -> Result<PruneReport> {
        match self {
            NetAccess::Direct { dirs } => super::prune(dirs).await,
            NetAccess::Netd { state, .. } => match self
                .call(Request::Prune {
                    state: state.clone(),
                })
                .await?
            {
                Reply::Removed { removed } => Ok(PruneReport {
                    removed,
                    left: Vec::new(),
                }),
                other => Err(unexpected(&other)),
            },
        }
    }
}

fn unexpected(r: &Reply) -> Error {
    Error::network(
        format!("netd gave an unexpected answer: {r:?}"),
        "check that netd is this version of boma-qvm (`boma-qvm --version` on both sides)",
    )
}
