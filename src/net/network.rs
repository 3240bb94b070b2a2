//! `Network`: bring the isolated VM network up and down, register VMs on it, switch egress.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Instant;

use super::config::NetConfig;
use super::files::NetFiles;
use super::ident::{Mac, ip_for, mac_for};
use super::registry::{self, VmNet};
use super::rtnl::Rtnl;
use super::status::{DnsmasqState, NetStatus};
use super::{bridge, dnsmasq, lease, nft, sysctl};
use crate::paths::Dirs;
use crate::paths::write_atomic;
use crate::tools;
use crate::{Error, Result, error::show};

/// Handle on the network's state (config + files). Cheap; `attach` makes one without touching
/// the system, `up` builds/repairs the network and returns one.
#[derive(Debug, Clone)]
pub struct Network {
    cfg: NetConfig,
    files: NetFiles,
}

impl Network {
    /// A handle for a network brought up earlier (e.g. by another process). No side effects.
    pub fn attach(dirs: &Dirs, cfg: &NetConfig) -> Network {
        Network {
            cfg: cfg.clone(),
            files: NetFiles::new(dirs),
        }
    }

    /// The network in `dirs` as its last `up` saved it (the default config when there is none).
    pub fn saved(dirs: &Dirs) -> Network {
        Network::attach(dirs, &Network::saved_config(dirs))
    }

    /// The config the last `up` in `dirs` saved, else the default.
    pub fn saved_config(dirs: &Dirs) -> NetConfig {
        std::fs::read_to_string(NetFiles::new(dirs).config())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// Build the network, or repair/reuse what exists (idempotent): bridge with the gateway
    /// address, IPv4 forwarding, our nft table, our dnsmasq (restarted if it died).
    pub async fn up(dirs: &Dirs, cfg: &NetConfig) -> Result<Network> {
        let start = Instant::now();
        cfg.validate()?;
        tools::require_all(&["nft", "dnsmasq"])?;
        let net = Network::attach(dirs, cfg);
        let files = &net.files;
        files.create_dirs()?;
        write_atomic(
            &files.config(),
            serde_json::to_string_pretty(cfg).expect("config serializes"),
        )?;

        let rtnl = Rtnl::connect()?;
        let (index, created) = bridge::ensure(&rtnl, cfg).await?;
        let verb = if created { "created" } else { "reusing" };
        tracing::info!(
            "{verb} bridge {} (ifindex {index}) with {}/{}",
            cfg.bridge,
            cfg.gateway(),
            cfg.subnet.prefix()
        );
        sysctl::enable_ip_forward(&files.ip_forward_marker())?;

        let vms = registry::load_all(files)?;
        let no_egress: Vec<Ipv4Addr> = vms.iter().filter(|v| !v.egress).map(|v| v.ip).collect();
        nft::load(cfg, &no_egress, &files.ruleset())?;
        tracing::info!(
            "loaded nft table inet {} from {}",
            nft::TABLE,
            show(&files.ruleset())
        );

        registry::write_dnsmasq_files(files, &vms)?;
        dnsmasq::write_servers(files, &net.upstream_for(&vms))?;
        let conf = dnsmasq::render(cfg, files, &dnsmasq::current_user());
        let old = std::fs::read_to_string(files.dnsmasq_conf()).ok();
        let had_pid_file = files.pid().exists();
        write_atomic(&files.dnsmasq_conf(), &conf)?;
        match dnsmasq::running_pid(files) {
            // A bridge created just now is a new interface: restart rather than trust old sockets.
            Some(pid) if !created && old.as_deref() == Some(conf.as_str()) => {
                dnsmasq::reload(files)?;
                tracing::info!("dnsmasq already running (pid {pid}), reloaded");
            }
            Some(pid) => {
                dnsmasq::stop(files)?;
                let new = dnsmasq::start(files)?;
                tracing::info!("dnsmasq restarted for a new config or bridge (pid {pid} -> {new})");
            }
            None => {
                let pid = dnsmasq::start(files)?;
                if had_pid_file {
                    tracing::warn!(
                        "dnsmasq had died; restarted it (pid {pid}); its log: {}",
                        show(&files.log())
                    );
                } else {
                    tracing::info!("started dnsmasq (pid {pid}) on {}", cfg.bridge);
                }
            }
        }
        tracing::info!("network up in {:.2}s", start.elapsed().as_secs_f64());
        Ok(net)
    }

    /// Tear the network down: dnsmasq, our nft table, the bridge. VM records stay (a later `up`
    /// restores their leases and egress); `prune` clears everything.
    pub async fn down(self) -> Result<()> {
        let start = Instant::now();
        if dnsmasq::stop(&self.files)? {
            tracing::info!("stopped dnsmasq");
        }
        nft::delete_table()?;
        let rtnl = Rtnl::connect()?;
        if bridge::delete(&rtnl, &self.cfg.bridge).await? {
            tracing::info!("deleted bridge {}", self.cfg.bridge);
        }
        sysctl::restore_ip_forward(&self.files.ip_forward_marker())?;
        tracing::info!("network down in {:.2}s", start.elapsed().as_secs_f64());
        Ok(())
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// dnsmasq's lease file, for `wait_for_lease`.
    pub fn lease_file(&self) -> PathBuf {
        self.files.leases()
    }

    pub fn files(&self) -> &NetFiles {
        &self.files
    }

    /// All registered VMs.
    pub fn vms(&self) -> Result<Vec<VmNet>> {
        registry::load_all(&self.files)
    }

    /// The network identity for VM `name`: its deterministic MAC, and its registered address or a
    /// new stable one that no other registered VM has. Does not register it.
    pub fn vm_net(&self, name: &str, dns_names: Vec<String>, egress: bool) -> Result<VmNet> {
        let vms = self.vms()?;
        let ip = match vms.iter().find(|v| v.name == name) {
            Some(v) => v.ip,
            None => ip_for(
                name,
                &self.cfg,
                &vms.iter().map(|v| v.ip).collect::<Vec<_>>(),
            )?,
        };
        Ok(VmNet {
            name: name.to_string(),
            mac: mac_for(name),
            ip,
            dns_names,
            egress,
        })
    }

    /// Register (or update) a VM: static lease, local DNS answers, egress state; dnsmasq re-reads
    /// its files on SIGHUP, the nft set is edited live.
    pub fn register_vm(&self, vm: &VmNet) -> Result<()> {
        vm.validate()?;
        let (first, last) = self.cfg.vm_range();
        if vm.ip < first || vm.ip > last {
            return Err(Error::input(
                format!(
                    "address {} for VM {} is outside the VM range {first}-{last}",
                    vm.ip, vm.name
                ),
                "use `Network::vm_net` (or `ip_for`) to pick the address",
            ));
        }
        let mut vms = self.vms()?;
        if let Some(o) = vms
            .iter()
            .find(|o| o.name != vm.name && (o.ip == vm.ip || o.mac == vm.mac))
        {
            return Err(Error::AlreadyExists {
                what: format!(
                    "VM {} with the same address or MAC ({} / {}) as {}",
                    o.name, o.ip, o.mac, vm.name
                ),
                fix: format!(
                    "unregister it (`boma-qvm down {}`) or pick another address",
                    o.name
                ),
            });
        }
        let old = vms.iter().find(|o| o.name == vm.name).cloned();
        registry::save(&self.files, vm)?;
        vms.retain(|o| o.name != vm.name);
        vms.push(vm.clone());
        if nft::table_exists()? {
            if let Some(o) = old.filter(|o| o.ip != vm.ip) {
                nft::set_egress(o.ip, true)?;
            }
            nft::set_egress(vm.ip, vm.egress)?;
        }
        self.refresh_dnsmasq(&vms)?;
        tracing::info!(
            "registered VM {} ({} -> {}, egress {})",
            vm.name,
            vm.mac,
            vm.ip,
            on_off(vm.egress)
        );
        Ok(())
    }

    /// Remove a VM: its static lease, DNS answers, egress entry and its lines in the lease file
    /// (dnsmasq keeps leases in memory, so a running one is stopped around the edit).
    /// Returns whether it was registered.
    pub fn unregister_vm(&self, name: &str) -> Result<bool> {
        let Some(vm) = registry::remove(&self.files, name)? else {
            return Ok(false);
        };
        if nft::table_exists()? {
            nft::set_egress(vm.ip, true)?;
        }
        let vms = self.vms()?;
        let was_running = dnsmasq::stop(&self.files)?;
        forget_lease(&self.files, &vm.mac)?;
        registry::write_dnsmasq_files(&self.files, &vms)?;
        dnsmasq::write_servers(&self.files, &self.upstream_for(&vms))?;
        if was_running {
            dnsmasq::start(&self.files)?;
        }
        tracing::info!("unregistered VM {name} ({})", vm.ip);
        Ok(true)
    }

    /// Switch egress (masquerade + forwarding beyond the subnet) for the VM at `ip`, live.
    pub fn set_egress(&self, ip: Ipv4Addr, on: bool) -> Result<()> {
        let mut vms = self.vms()?;
        let vm = vms.iter_mut().find(|v| v.ip == ip).ok_or_else(|| {
            Error::not_found(
                format!("a VM with address {ip} on the network"),
                "list them with `boma-qvm net status`",
            )
        })?;
        vm.egress = on;
        registry::save(&self.files, vm)?;
        let name = vm.name.clone();
        nft::set_egress(ip, on)?;
        self.refresh_dnsmasq(&vms)?;
        tracing::info!("egress {} for VM {name} ({ip})", on_off(on));
        Ok(())
    }

    /// What is up and what is not.
    pub async fn status(&self) -> Result<NetStatus> {
        let rtnl = Rtnl::connect()?;
        let bridge = match rtnl.link(&self.cfg.bridge).await? {
            Some(l) => Some((l.up, rtnl.ipv4_addrs(l.index).await?)),
            None => None,
        };
        let dnsmasq = match dnsmasq::running_pid(&self.files) {
            Some(pid) => DnsmasqState::Running(pid.as_raw() as u32),
            None if self.files.pid().exists() => DnsmasqState::Died,
            None => DnsmasqState::Stopped,
        };
        let forward = sysctl::ip_forward_on();
        Ok(NetStatus {
            bridge_name: self.cfg.bridge.clone(),
            bridge,
            table_loaded: nft::table_exists()?,
            dnsmasq,
            ip_forward: forward,
            vms: self.vms()?,
        })
    }

    /// Upstream DNS only while egress is on. dnsmasq has one upstream list for the whole network,
    /// so this is network-wide: any registered VM with egress off turns upstream DNS off for all.
    /// Fine while boma-qvm runs one VM at a time.
    fn upstream_for(&self, vms: &[VmNet]) -> Vec<std::net::IpAddr> {
        if vms.iter().all(|v| v.egress) {
            dnsmasq::upstream_servers(&self.cfg)
        } else {
            Vec::new()
        }
    }

    fn refresh_dnsmasq(&self, vms: &[VmNet]) -> Result<()> {
        registry::write_dnsmasq_files(&self.files, vms)?;
        dnsmasq::write_servers(&self.files, &self.upstream_for(vms))?;
        dnsmasq::reload(&self.files)?;
        Ok(())
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// Drop `mac`'s lines from the lease file (dnsmasq must not be running).
fn forget_lease(files: &NetFiles, mac: &Mac) -> Result<()> {
    let path = files.leases();
    match std::fs::read_to_string(&path) {
        Ok(text) => write_atomic(&path, lease::without_mac(&text, mac)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            context: format!("reading {}", show(&path)),
            source: e,
        }),
    }
}
