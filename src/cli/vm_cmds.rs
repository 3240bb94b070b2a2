//! VM lifecycle subcommands: up, start, down, status, list, console, reboot, shutdown, prune.

use boma_qvm::machine::accel::{self, AccelChoice, KvmProbe};
use boma_qvm::machine::{Machine, OsSource, ShutdownOutcome, StartOptions, State, UpRequest};
use boma_qvm::net::NetConfig;
use boma_qvm::net::access::NetAccess;
use boma_qvm::paths::Dirs;
use boma_qvm::stage::Stages;
use boma_qvm::{Error, Result, machine::console, machine::prune as prune_mod};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct VmArg {
    /// VM or host name (`askari` or `boma-it-askari`).
    pub vm: String,
}

#[derive(Args, Debug)]
pub struct OptVmArg {
    /// VM or host name; default: the only VM.
    pub vm: Option<String>,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// The host this VM mirrors; the VM is named boma-it-HOST.
    pub host: String,
    /// Golden image: built (the default: Debian 13 built offline, with Docker and the guest
    /// agent; built on first use), cloud (Debian's genericcloud: no Docker, no agent), or the
    /// name of an image in `boma-qvm image list`.
    #[arg(long, conflicts_with = "kernel")]
    pub image: Option<String>,
    /// Direct kernel boot of a kernel/initrd with no disk image or seed (test guests).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: the initrd.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: the kernel command line.
    #[arg(long, requires = "kernel", default_value = "console=ttyS0")]
    pub append: String,
    #[command(flatten)]
    pub machine: MachineArgs,
    #[command(flatten)]
    pub net: NetArgs,
    /// Do not wait for SSH (a lease is still awaited when there is a network).
    #[arg(long)]
    pub no_wait_ssh: bool,
}

/// The machine's size and accelerator.
#[derive(Args, Debug, Clone)]
pub struct MachineArgs {
    /// vCPUs.
    #[arg(long, default_value_t = boma_qvm::machine::spec::DEFAULT_CPUS)]
    pub cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = boma_qvm::machine::spec::DEFAULT_MEMORY_MIB)]
    pub memory: u32,
    /// Virtual size of the VM's disk (thin overlay), GiB.
    #[arg(long, default_value_t = boma_qvm::machine::spec::DEFAULT_DISK_GIB)]
    pub disk_gib: u64,
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// With --accel kvm: use KVM even when the check says it is not usable.
    #[arg(long)]
    pub force_accel: bool,
    /// Refuse to start with less free RAM than this (MiB). Default: guest RAM + 1024.
    #[arg(long, env = "BOMA_QVM_MIN_FREE_MIB")]
    pub min_free_mib: Option<u64>,
    /// How many VMs may run at once.
    #[arg(long, env = "BOMA_QVM_MAX_VMS", default_value_t = 1)]
    pub max_vms: usize,
    /// Extra console lines that mean failure (waits fail fast on them). Repeatable.
    #[arg(long = "console-pattern")]
    pub console_patterns: Vec<String>,
    /// Cap TCG's translation cache (MiB); about halves QEMU's memory under TCG.
    #[arg(long)]
    pub tb_size: Option<u32>,
    /// Boot from scratch. By default a VM from a golden image is restored from that image's
    /// warm template (booted once to ready and saved; built on first use) and re-identified.
    #[arg(long)]
    pub cold: bool,
}

/// The isolated network.
#[derive(Args, Debug, Clone)]
pub struct NetArgs {
    /// No NIC at all.
    #[arg(long)]
    pub no_net: bool,
    /// Start with outbound NAT off (the "egress lost" scenario); `boma-qvm fault VM egress-on` restores it.
    #[arg(long)]
    pub no_egress: bool,
    /// The bridge.
    #[arg(long, default_value = boma_qvm::net::config::DEFAULT_BRIDGE)]
    pub bridge: String,
    /// The VMs' subnet (the bridge takes .1).
    #[arg(long, default_value = boma_qvm::net::config::DEFAULT_SUBNET)]
    pub subnet: String,
    /// A name the VM's DNS resolves to the VM itself (repeatable), e.g. askari.wingu.me.
    #[arg(long = "dns-name")]
    pub dns_names: Vec<String>,
}

impl NetArgs {
    pub fn config(&self) -> Result<Option<NetConfig>> {
        if self.no_net {
            return Ok(None);
        }
        let subnet = self.subnet.parse()?;
        Ok(Some(NetConfig {
            bridge: self.bridge.clone(),
            subnet,
            upstream_dns: None,
        }))
    }
}

/// Resolve the accelerator, and the one-line fallback warning for the caller to print once the
/// rest of the input is known to be good.
pub fn resolve_accel(m: &MachineArgs) -> Result<(boma_qvm::machine::accel::Accel, Option<String>)> {
    accel::resolve(m.accel, &KvmProbe::read(), m.force_accel)
}

/// The image `--image` names (the default when absent), and why, for the log and report.
pub fn image_choice(flag: Option<&str>) -> Result<(boma_qvm::guest::image::ImageChoice, String)> {
    let choice = match flag {
        Some(name) => name.parse()?,
        None => boma_qvm::guest::image::ImageChoice::default(),
    };
    let reason = choice.reason(flag.is_some());
    Ok((choice, reason))
}

/// An `UpRequest` from the shared flags.
pub fn request(host: &str, os: OsSource, m: &MachineArgs, n: &NetArgs) -> Result<UpRequest> {
    let (accel, accel_warning) = resolve_accel(m)?;
    let mut req = UpRequest::new(host, os, accel);
    req.cpus = m.cpus;
    req.memory_mib = m.memory;
    req.disk_gib = m.disk_gib;
    req.console_patterns = m.console_patterns.clone();
    req.tcg_tb_size_mib = m.tb_size;
    req.cold = m.cold;
    req.start = start_options(m.min_free_mib, m.max_vms);
    req.net = n.config()?;
    req.egress = !n.no_egress;
    req.dns_names = n.dns_names.clone();
    // Printed once the rest of the input is checked: a warning before a refusal is noise.
    req.accel_warning = accel_warning;
    Ok(req)
}

#[derive(Args, Debug)]
pub struct ConsoleArgs {
    pub vm: Option<String>,
    /// Print the captured console log instead of attaching.
    #[arg(long)]
    pub log: bool,
    /// With --log: keep printing while the VM runs.
    #[arg(long, requires = "log")]
    pub follow: bool,
}

#[derive(Args, Debug)]
pub struct RebootArgs {
    pub vm: Option<String>,
    /// Press reset instead of a clean ACPI reboot.
    #[arg(long)]
    pub hard: bool,
    /// Seconds the guest gets to shut down (default scales with the accelerator).
    #[arg(long)]
    pub timeout: Option<u64>,
}

#[derive(Args, Debug)]
pub struct ShutdownArgs {
    pub vm: Option<String>,
    /// Seconds the guest gets to power off before QEMU is stopped (default scales with the accelerator).
    #[arg(long)]
    pub timeout: Option<u64>,
}

fn start_options(min_free_mib: Option<u64>, max_vms: usize) -> StartOptions {
    StartOptions {
        min_free_mib,
        max_vms,
        ..StartOptions::default()
    }
}

pub async fn up(dirs: &Dirs, a: UpArgs) -> Result<()> {
    let mut reason = String::new();
    let os = match a.kernel {
        Some(kernel) => OsSource::Kernel {
            kernel,
            initrd: a.initrd,
            append: a.append,
        },
        None => {
            let (choice, why) = image_choice(a.image.as_deref())?;
            reason = why;
            OsSource::Image(choice)
        }
    };
    let mut req = request(&a.host, os, &a.machine, &a.net)?;
    req.image_reason = reason;
    req.wait_ssh &= !a.no_wait_ssh;
    let mut stages = Stages::new();
    let m = Machine::up_staged(dirs, &req, &mut stages).await?;
    let ip = m.ip().map(|ip| format!(" at {ip}")).unwrap_or_default();
    println!(
        "{} is up{ip} ({} accel, {:.0}s); `boma-qvm ssh {}`, `boma-qvm console {}`",
        m.name(),
        req.accel.as_str(),
        stages.total_seconds(),
        a.host,
        a.host
    );
    Ok(())
}

pub async fn start(dirs: &Dirs, a: VmArg) -> Result<()> {
    let m = Machine::attach(dirs, &a.vm)?;
    m.start().await?;
    println!("{} is running", m.name());
    Ok(())
}

pub async fn down(dirs: &Dirs, a: VmArg) -> Result<()> {
    let m = Machine::attach(dirs, &a.vm)?;
    let name = m.name().to_string();
    m.down().await?;
    println!("{name} destroyed");
    Ok(())
}

fn describe(m: &Machine) -> Result<String> {
    let spec = m.spec()?;
    let state = m.state();
    let mut s = format!(
        "{}  {}  accel={} cpus={} memory={}MiB",
        m.name(),
        state.as_str(),
        spec.accel.as_str(),
        spec.cpus,
        spec.memory_mib
    );
    if let State::Running { supervisor, qemu } = state {
        s.push_str(&format!("  qemu-pid={qemu} supervisor-pid={supervisor}"));
        if let Some(uid) = boma_qvm::machine::procs::uid(qemu) {
            let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| uid.to_string());
            s.push_str(&format!(" qemu-user={name}"));
        }
        if let Some(pty) = m.console_pty() {
            s.push_str(&format!("  console={}", pty.display()));
        }
    }
    if let Ok(ip) = m.ip() {
        s.push_str(&format!("  ip={ip}"));
    }
    if let Some(last) = m.events()?.last() {
        s.push_str(&format!("  last-event={}", last.event));
    }
    s.push_str(&format!("\n  run dir: {}", m.run_dir().display()));
    Ok(s)
}

/// An error on one line (`problem; fix: ...`), for a row of a listing.
fn one_line(e: &Error) -> String {
    e.to_string().replace("\n  ", "; ")
}

pub async fn status(dirs: &Dirs, a: OptVmArg) -> Result<()> {
    let named = a.vm.is_some();
    let machines = match a.vm {
        Some(n) => vec![Machine::attach(dirs, &n)?],
        None => Machine::list(dirs)
            .iter()
            .map(|n| Machine::attach(dirs, n))
            .collect::<Result<_>>()?,
    };
    if machines.is_empty() {
        println!("no VMs");
    }
    let mut networked = None;
    for m in &machines {
        match describe(m) {
            Ok(d) => println!("{d}"),
            // One broken run directory must not hide the others: mark it and go on.
            Err(e) if !named => println!(
                "{}  BROKEN
  {e}",
                m.name()
            ),
            Err(e) => return Err(e),
        }
        if networked.is_none()
            && let Ok(Some(a)) = m.net_access()
        {
            networked = Some(a);
        }
    }
    if let Some(access) = networked {
        let st = access.status().await?;
        print!("network:\n{st}");
        if !st.healthy() {
            println!("  fix: `boma-qvm net up` (or `boma-qvm start VM`) repairs it");
        }
    }
    Ok(())
}

pub fn list(dirs: &Dirs) -> Result<()> {
    for name in Machine::list(dirs) {
        let m = Machine::attach(dirs, &name)?;
        match m.spec() {
            Ok(_) => println!("{name}	{}", m.state().as_str()),
            Err(e) => println!("{name}	BROKEN	{}", one_line(&e)),
        }
    }
    Ok(())
}

pub async fn console(dirs: &Dirs, a: ConsoleArgs) -> Result<()> {
    let m = Machine::resolve(dirs, a.vm.as_deref())?;
    if a.log {
        return console::print_log(&m.console_log(), a.follow, || m.is_running()).await;
    }
    let pty = m.console_pty().ok_or_else(|| {
        Error::qemu(
            format!(
                "{} has no live console (it is {})",
                m.name(),
                m.state().as_str()
            ),
            format!(
                "read the captured log with `boma-qvm console {} --log`",
                m.name()
            ),
        )
    })?;
    let name = m.name().to_string();
    tokio::task::spawn_blocking(move || console::attach(&pty, &name))
        .await
        .expect("console task")
}

pub async fn reboot(dirs: &Dirs, a: RebootArgs) -> Result<()> {
    let m = Machine::resolve(dirs, a.vm.as_deref())?;
    if a.hard {
        m.hard_reset().await?;
        println!("{} rebooted (hard reset)", m.name());
        return Ok(());
    }
    let timeout = a.timeout.map(Duration::from_secs);
    let r = m.reboot_within(timeout).await?;
    println!(
        "{} rebooted cleanly (guest shutdown {:.1}s, boot {:.1}s{})",
        m.name(),
        r.shutdown_secs,
        r.boot_secs,
        match &r.boot_ids {
            Some((a, b)) => format!(", boot_id {a} -> {b}"),
            None => String::new(),
        }
    );
    Ok(())
}

pub async fn shutdown(dirs: &Dirs, a: ShutdownArgs) -> Result<()> {
    let m = Machine::resolve(dirs, a.vm.as_deref())?;
    let outcome = match a.timeout {
        Some(s) => m.shutdown_within(Duration::from_secs(s)).await?,
        None => m.shutdown().await?,
    };
    match outcome {
        ShutdownOutcome::Clean => println!("{} shut down cleanly", m.name()),
        ShutdownOutcome::Forced => {
            println!("{} did not power off in time; QEMU was stopped", m.name())
        }
    }
    Ok(())
}

pub async fn prune(dirs: &Dirs) -> Result<()> {
    let r = prune_mod::prune(dirs).await?;
    let stray = if r.processes.is_empty() {
        String::new()
    } else {
        format!(", {} stray process(es)", r.processes.len())
    };
    println!("pruned {} VM(s){stray}", r.vms.len());
    match NetAccess::choose(dirs) {
        Ok(access) => println!("{}", access.prune().await?),
        Err(e) => println!(
            "network: not pruned: {}",
            e.to_string().replace("\n  ", "; ")
        ),
    }
    println!("{}", prune_image_staging(dirs)?);
    Ok(())
}

/// What an interrupted `up`/`cycle`/`start` of `host` left behind, and how to reap it.
pub async fn left_behind(dirs: &Dirs, host: &str) -> String {
    let Ok(name) = boma_qvm::machine::spec::vm_name(host) else {
        return "  nothing was made".into();
    };
    let mut lines = Vec::new();
    let vm = Machine::attach(dirs, &name).ok();
    if let Some(vm) = &vm {
        lines.push(match vm.state() {
            State::Running { qemu, .. } => format!(
                "  VM {name} is running (QEMU pid {qemu}), kept so you can see how far it got: \
                 `boma-qvm console {host} --log`, `boma-qvm status {host}`"
            ),
            State::Off => format!(
                "  VM {name} was made but is not running: {}",
                vm.run_dir().display()
            ),
        });
    }
    let mut idle_net = false;
    let status = match vm.as_ref().and_then(|m| m.net_access().ok().flatten()) {
        Some(a) => a.status().await,
        None => match NetAccess::choose(dirs) {
            Ok(a) => a.status().await,
            Err(e) => Err(e),
        },
    };
    match status {
        Ok(st) if !st.is_down() => {
            let on: Vec<&str> = st.vms.iter().map(|v| v.name.as_str()).collect();
            idle_net = on.is_empty();
            lines.push(format!(
                "  the isolated network is up (bridge {}, nft table inet boma_qvm, dnsmasq); VMs on it: {}",
                st.bridge_name,
                if on.is_empty() { "none".into() } else { on.join(", ") }
            ));
        }
        Ok(_) => {}
        Err(e) => lines.push(format!("  the network's state is unknown: {e}")),
    }
    if vm.is_some() {
        lines.push(format!(
            "  fix: `boma-qvm down {host}` removes the VM and, once no VM uses it, the network; \
             `boma-qvm prune` reaps every boma-qvm VM and the network"
        ));
    } else if idle_net {
        lines.push("  fix: `boma-qvm net down` (or `boma-qvm prune`) removes the network".into());
    }
    if lines.is_empty() {
        "  nothing was left behind".into()
    } else {
        format!("left behind:\n{}", lines.join("\n"))
    }
}

/// Reap the image cache's stale staging directories (never waiting on a running image command).
pub fn prune_image_staging(dirs: &Dirs) -> Result<String> {
    use boma_qvm::guest::image::store::{StagingPrune, prune_staging};
    Ok(match prune_staging(dirs)? {
        StagingPrune::Removed(v) if v.is_empty() => {
            "image cache: no stale staging directories".into()
        }
        StagingPrune::Removed(v) => format!(
            "image cache: removed {} stale staging entr{} ({})",
            v.len(),
            if v.len() == 1 { "y" } else { "ies" },
            v.join(", ")
        ),
        StagingPrune::NotWritable => format!(
            "image cache: {} is not this user's to clean (root's shared cache?); left alone",
            dirs.images().display()
        ),
        StagingPrune::Busy => format!(
            "image cache: another image command is running (it holds {}); staging directories \
             left alone, run `boma-qvm prune` again once it is done",
            dirs.images().join(".lock").display()
        ),
    })
}

#[derive(Args, Debug)]
pub struct SshArgs {
    pub vm: Option<String>,
    /// A command to run instead of a shell.
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

pub fn ssh(dirs: &Dirs, a: SshArgs) -> Result<()> {
    let conn = Machine::resolve(dirs, a.vm.as_deref())?.conn()?;
    let cmd = (!a.cmd.is_empty()).then_some(a.cmd.as_slice());
    match boma_qvm::guest::ssh::exec_shell(&conn, cmd)? {}
}
