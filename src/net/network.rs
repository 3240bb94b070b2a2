//! `Network`: bring the isolated VM network up and down, register VMs on it, switch egress.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Instant;

use super::config::NetConfig;
use super::files::NetFiles;
use super::ident::{Mac, ip_for, mac_for};
use super::owned::{self, LinkRecord, Owned};
use super::registry::{self, VmNet};
use super::rtnl::Rtnl;
use super::status::{DnsmasqState, NetStatus};
use super::{bridge, dnsmasq, lease, nft, sysctl, tap};
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
    ///
    /// Everything that can refuse is checked before anything is made or saved: the config, the
    /// tools, one network per state, and ownership (a bridge or nft table this state did not
    /// make is never adopted). A refused `up` leaves no trace, not even its config.
    pub async fn up(dirs: &Dirs, cfg: &NetConfig) -> Result<Network> {
        let start = Instant::now();
        cfg.validate()?;
        tools::require_all(&["nft", "dnsmasq"])?;
        let net = Network::attach(dirs, cfg);
        let files = &net.files;
        let owned = Owned::load(files)?;
        let marker = owned::marker(files);
        let rtnl = Rtnl::connect()?;
        if let Some(rec) = owned.bridge.as_ref().filter(|r| r.name != cfg.bridge)
            && rtnl
                .link(&rec.name)
                .await?
                .is_some_and(|l| bridge::is_recorded(&l, Some(rec)))
        {
            return Err(Error::network(
                format!(
                    "this state's network already runs on bridge {}, not {}",
                    rec.name, cfg.bridge
                ),
                format!(
                    "one network per state directory: take it down first (`boma-qvm net down`), \
                     or keep --bridge {}",
                    rec.name
                ),
            ));
        }
        let existing = bridge::check(&rtnl, cfg, owned.bridge.as_ref()).await?;
        match nft::table_owner()? {
            Some(c) if c != marker => return Err(foreign_table(&c)),
            _ => {}
        }
        dnsmasq::check_public_dir(files, &owned)?;

        files.create_dirs()?;
        write_atomic(
            &files.config(),
            serde_json::to_string_pretty(cfg).expect("config serializes"),
        )?;
        let (index, made) = bridge::ensure(&rtnl, cfg, existing, &marker).await?;
        let created = made.is_some();
        if let Some(rec) = made {
            Owned::update(files, |o| o.bridge = Some(rec))?;
        }
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
        Owned::update(files, |o| o.table = true)?;
        nft::load(cfg, &no_egress, &marker, &files.ruleset())?;
        tracing::info!(
            "loaded nft table inet {} from {}",
            nft::TABLE,
            show(&files.ruleset())
        );

        // Who dnsmasq runs as decides where its re-read files go: first, then write them.
        let (user, group) = dnsmasq::run_as(files)?;
        registry::write_dnsmasq_files(files, &vms)?;
        dnsmasq::write_servers(files, &net.upstream_for(&vms))?;
        let conf = dnsmasq::render(cfg, files, &user, &group);
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

    /// Tear the network down: dnsmasq, and what this state recorded as its own (the nft table,
    /// the bridge, taps and veths still there). VM records stay (a later `up` restores their
    /// leases and egress); `prune` clears everything. Returns what was removed.
    pub async fn down(self) -> Result<Vec<String>> {
        let start = Instant::now();
        let mut removed = Vec::new();
        if let Some(pid) = dnsmasq::running_pid(&self.files) {
            dnsmasq::stop(&self.files)?;
            tracing::info!("stopped dnsmasq");
            removed.push(format!("dnsmasq (pid {pid})"));
        }
        removed.extend(remove_recorded(&self.files).await?);
        for r in &removed[..] {
            if r.starts_with("bridge ") {
                tracing::info!("deleted {r}");
            }
        }
        if self.files.ip_forward_marker().exists() {
            sysctl::restore_ip_forward(&self.files.ip_forward_marker())?;
            removed.push("IPv4 forwarding (was off before)".to_string());
        }
        tracing::info!("network down in {:.2}s", start.elapsed().as_secs_f64());
        Ok(removed)
    }

    /// The marker this state's bridge alias and nft table comment carry.
    pub fn marker(&self) -> String {
        owned::marker(&self.files)
    }

    /// Is the live nft table this state's own?
    fn table_is_ours(&self) -> Result<bool> {
        nft::table_is(&self.marker())
    }

    /// A tap for VM `name` on this state's bridge (which must be up and ours), recorded as ours
    /// until it is gone. See `tap::open_tap` for how the fd is meant to be used.
    pub async fn open_tap(&self, name: &str) -> Result<OwnedFd> {
        let owned = Owned::load(&self.files)?;
        let rtnl = Rtnl::connect()?;
        let ours = match rtnl.link(&self.cfg.bridge).await? {
            Some(l) if bridge::is_recorded(&l, owned.bridge.as_ref()) => true,
            Some(l) => return Err(bridge::foreign(&l)),
            None => false,
        };
        if !ours {
            return Err(Error::network(
                format!("bridge {} does not exist", self.cfg.bridge),
                "bring the network up first (`boma-qvm net up`, or `boma-qvm start VM`)",
            ));
        }
        let tap_name = super::ident::tap_name_for(name);
        let (fd, ifindex) = tap::open_tap(&tap_name, &self.cfg.bridge).await?;
        Owned::update(&self.files, |o| {
            o.taps.retain(|t| t.name != tap_name);
            o.taps.push(LinkRecord {
                name: tap_name.clone(),
                ifindex,
                owner: Some(name.to_string()),
            });
        })?;
        Ok(fd)
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
            owner: None,
            state: None,
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
        if self.table_is_ours()? {
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
        if self.table_is_ours()? {
            nft::set_egress(vm.ip, true)?;
        }
        let tap = super::ident::tap_name_for(name);
        Owned::update(&self.files, |o| o.taps.retain(|t| t.name != tap))?;
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
        if !self.table_is_ours()? {
            return Err(Error::network(
                format!(
                    "the network of this state is not up (no nft table of its own) to switch egress for {name}"
                ),
                "bring it up first (`boma-qvm net up`, or `boma-qvm start VM`)",
            ));
        }
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
            table_loaded: self.table_is_ours()?,
            dnsmasq,
            ip_forward: forward,
            vms: self.vms()?,
            via: None,
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

/// The refusal for a table `inet boma_qvm` this state did not load.
fn foreign_table(comment: &str) -> Error {
    match owned::marker_state(comment) {
        Some(state) => Error::network(
            format!(
                "nft table inet {} is loaded by another boma-qvm network (state {state}) in this network namespace",
                nft::TABLE
            ),
            format!(
                "two state directories cannot run a network in one network namespace: use that \
                 state (BOMA_QVM_STATE_DIR={}), or boma-qvm netd (one network shared safely by \
                 every user), or another network namespace",
                state.strip_suffix("/net").unwrap_or(state)
            ),
        ),
        None => Error::network(
            format!(
                "an nft table inet {} exists that this boma-qvm state did not load",
                nft::TABLE
            ),
            format!(
                "look at it (`nft list table inet {0}`); if it is a leftover of an older \
                 boma-qvm, delete it yourself (`nft delete table inet {0}`)",
                nft::TABLE
            ),
        ),
    }
}

/// Remove what `files` recorded as this state's own and is still there as recorded: the nft
/// table (only if its comment is ours), taps and veths (same name and ifindex), the bridge, the
/// directory of dnsmasq's re-read files (dnsmasq must be stopped). The record is cleared (but
/// for a directory of ours that could not be removed). Returns what was removed, one item each.
pub(crate) async fn remove_recorded(files: &NetFiles) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let owned = Owned::load(files)?;
    if owned.table && nft::delete_table(&owned::marker(files))? {
        removed.push(format!("nft table inet {}", nft::TABLE));
    }
    let rtnl = Rtnl::connect()?;
    for (kind, rec) in owned
        .taps
        .iter()
        .map(|t| ("tap", t))
        .chain(owned.veths.iter().map(|v| ("veth", v)))
    {
        if rtnl.delete_recorded(rec).await? {
            removed.push(format!("{kind} {}", rec.name));
        }
    }
    if let Some(rec) = &owned.bridge
        && bridge::delete(&rtnl, rec).await?
    {
        removed.push(format!("bridge {}", rec.name));
    }
    let kept_dir = match dnsmasq::remove_public_dir(&owned) {
        Ok(r) => {
            removed.extend(r);
            None
        }
        Err(e) => {
            tracing::warn!("{e}");
            owned.dnsmasq_dir.clone()
        }
    };
    Owned::update(files, |o| {
        *o = Owned {
            dnsmasq_dir: kept_dir,
            ..Owned::default()
        }
    })?;
    Ok(removed)
}
