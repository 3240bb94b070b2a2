//! VM lifecycle subcommands: up, start, down, status, list, console, reboot, shutdown, prune.

use boma_qvm::accel::{self, AccelChoice, KvmProbe};
use boma_qvm::net::NetConfig;
use boma_qvm::paths::Dirs;
use boma_qvm::power::{self, RebootMode, ShutdownOutcome};
use boma_qvm::provision::{self, OsSource, UpRequest};
use boma_qvm::stage::Stages;
use boma_qvm::vm::{self, StartOptions, State, Vm};
use boma_qvm::{Error, Result, console, prune as prune_mod};
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
    /// Golden image: auto (cached cloud image, else cached offline build, else pull, else build),
    /// cloud, built, or the name of an imported image.
    #[arg(long, default_value = "auto", conflicts_with = "kernel")]
    pub image: String,
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
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 3072)]
    pub memory: u32,
    /// Virtual size of the VM's disk (thin overlay), GiB.
    #[arg(long, default_value_t = 20)]
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
pub fn resolve_accel(m: &MachineArgs) -> Result<(boma_qvm::accel::Accel, Option<String>)> {
    accel::resolve(m.accel, &KvmProbe::read(), m.force_accel)
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
    req.start = start_options(m.min_free_mib, m.max_vms);
    req.net = n.config()?;
    req.egress = !n.no_egress;
    req.dns_names = n.dns_names.clone();
    // Only now, with every flag checked: a warning before a refusal is noise.
    if let Some(w) = accel_warning {
        eprintln!("{w}");
    }
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
    let os = match a.kernel {
        Some(kernel) => {
            for p in std::iter::once(&kernel).chain(a.initrd.iter()) {
                if !p.exists() {
                    return Err(Error::not_found(
                        p.display().to_string(),
                        "give an existing kernel/initrd path",
                    ));
                }
            }
            OsSource::Kernel {
                kernel,
                initrd: a.initrd,
                append: a.append,
            }
        }
        None => OsSource::Image(a.image.parse()?),
    };
    let mut req = request(&a.host, os, &a.machine, &a.net)?;
    req.wait_ssh &= !a.no_wait_ssh;
    let mut stages = Stages::new();
    let up = provision::up(dirs, &req, &mut stages).await?;
    let ip = up.ip.map(|ip| format!(" at {ip}")).unwrap_or_default();
    println!(
        "{} is up{ip} ({} accel, {:.0}s); `boma-qvm ssh {}`, `boma-qvm console {}`",
        up.vm.name,
        req.accel.as_str(),
        stages.total_seconds(),
        a.host,
        a.host
    );
    Ok(())
}

pub async fn start(dirs: &Dirs, a: VmArg) -> Result<()> {
    let vm = Vm::resolve(dirs, Some(&a.vm))?;
    provision::start(dirs, &vm, &StartOptions::default()).await?;
    println!("{} is running", vm.name);
    Ok(())
}

pub async fn down(dirs: &Dirs, a: VmArg) -> Result<()> {
    let vm = Vm::resolve(dirs, Some(&a.vm))?;
    let name = vm.name.clone();
    provision::teardown(vm).await?;
    println!("{name} destroyed");
    Ok(())
}

fn describe(vm: &Vm) -> Result<String> {
    let spec = vm.spec()?;
    let state = vm.state();
    let mut s = format!(
        "{}  {}  accel={} cpus={} memory={}MiB",
        vm.name,
        state.as_str(),
        spec.accel.as_str(),
        spec.cpus,
        spec.memory_mib
    );
    if let State::Running { supervisor, qemu } = state {
        s.push_str(&format!("  qemu-pid={qemu} supervisor-pid={supervisor}"));
        if let Ok(pty) = std::fs::read_to_string(vm.run.console_pty()) {
            s.push_str(&format!("  console={pty}"));
        }
    }
    if let Ok(ip) = provision::vm_ip(&vm.dirs, vm) {
        s.push_str(&format!("  ip={ip}"));
    }
    if let Some(last) = vm.events()?.last() {
        s.push_str(&format!("  last-event={}", last.event));
    }
    s.push_str(&format!("\n  run dir: {}", vm.run.dir.display()));
    Ok(s)
}

/// An error on one line (`problem; fix: ...`), for a row of a listing.
fn one_line(e: &Error) -> String {
    e.to_string().replace("\n  ", "; ")
}

pub async fn status(dirs: &Dirs, a: OptVmArg) -> Result<()> {
    let named = a.vm.is_some();
    let vms = match a.vm {
        Some(n) => vec![Vm::resolve(dirs, Some(&n))?],
        None => vm::list(dirs)
            .iter()
            .map(|n| Vm::open(dirs, n))
            .collect::<Result<_>>()?,
    };
    if vms.is_empty() {
        println!("no VMs");
    }
    let mut networked = false;
    for vm in &vms {
        match describe(vm) {
            Ok(d) => println!("{d}"),
            // One broken run directory must not hide the others: mark it and go on.
            Err(e) if !named => println!("{}  BROKEN\n  {e}", vm.name),
            Err(e) => return Err(e),
        }
        networked |= vm.spec().is_ok_and(|s| s.nic.is_some());
    }
    if networked {
        let net = boma_qvm::net::Network::attach(dirs, &provision::saved_net_config(dirs));
        let st = net.status().await?;
        print!("network:\n{st}");
        if !st.healthy() {
            println!("  fix: `boma-qvm net up` (or `boma-qvm start VM`) repairs it");
        }
    }
    Ok(())
}

pub fn list(dirs: &Dirs) -> Result<()> {
    for name in vm::list(dirs) {
        let vm = Vm::open(dirs, &name)?;
        match vm.spec() {
            Ok(_) => println!("{name}\t{}", vm.state().as_str()),
            Err(e) => println!("{name}\tBROKEN\t{}", one_line(&e)),
        }
    }
    Ok(())
}

pub async fn console(dirs: &Dirs, a: ConsoleArgs) -> Result<()> {
    let vm = Vm::resolve(dirs, a.vm.as_deref())?;
    if a.log {
        return console::print_log(&vm.run.console_log(), a.follow, || vm.is_running()).await;
    }
    let pty = std::fs::read_to_string(vm.run.console_pty()).map_err(|_| {
        Error::qemu(
            format!(
                "{} has no live console (it is {})",
                vm.name,
                vm.state().as_str()
            ),
            format!(
                "read the captured log with `boma-qvm console {} --log`",
                vm.name
            ),
        )
    })?;
    let name = vm.name.clone();
    tokio::task::spawn_blocking(move || console::attach(std::path::Path::new(pty.trim()), &name))
        .await
        .expect("console task")
}

fn scaled(vm: &Vm, explicit: Option<u64>, kvm_default: u64) -> Result<Duration> {
    Ok(match explicit {
        Some(s) => Duration::from_secs(s),
        None => vm.spec()?.accel.scale(Duration::from_secs(kvm_default)),
    })
}

pub async fn reboot(dirs: &Dirs, a: RebootArgs) -> Result<()> {
    let vm = Vm::resolve(dirs, a.vm.as_deref())?;
    let mode = if a.hard {
        RebootMode::Hard
    } else {
        RebootMode::Clean
    };
    power::reboot(&vm, mode, scaled(&vm, a.timeout, 60)?).await?;
    println!(
        "{} rebooted ({})",
        vm.name,
        if a.hard { "hard reset" } else { "clean" }
    );
    Ok(())
}

pub async fn shutdown(dirs: &Dirs, a: ShutdownArgs) -> Result<()> {
    let vm = Vm::resolve(dirs, a.vm.as_deref())?;
    match power::shutdown(&vm, scaled(&vm, a.timeout, 60)?).await? {
        ShutdownOutcome::Clean => println!("{} shut down cleanly", vm.name),
        ShutdownOutcome::Forced => {
            println!("{} did not power off in time; QEMU was stopped", vm.name)
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
    let n = boma_qvm::net::prune(dirs).await?;
    println!("{n}");
    println!("{}", prune_image_staging(dirs)?);
    Ok(())
}

/// What an interrupted `up`/`cycle`/`start` of `host` left behind, and how to reap it.
pub async fn left_behind(dirs: &Dirs, host: &str) -> String {
    let Ok(name) = boma_qvm::spec::vm_name(host) else {
        return "  nothing was made".into();
    };
    let mut lines = Vec::new();
    let vm = Vm::open(dirs, &name).ok();
    if let Some(vm) = &vm {
        lines.push(match vm.state() {
            State::Running { qemu, .. } => format!(
                "  VM {name} is running (QEMU pid {qemu}), kept so you can see how far it got: \
                 `boma-qvm console {host} --log`, `boma-qvm status {host}`"
            ),
            State::Off => format!(
                "  VM {name} was made but is not running: {}",
                vm.run.dir.display()
            ),
        });
    }
    let net = boma_qvm::net::Network::attach(dirs, &provision::saved_net_config(dirs));
    let mut idle_net = false;
    match net.status().await {
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
    use boma_qvm::image::store::{StagingPrune, prune_staging};
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
    let vm = Vm::resolve(dirs, a.vm.as_deref())?;
    let conn = provision::ssh_conn(dirs, &vm)?;
    let cmd = (!a.cmd.is_empty()).then_some(a.cmd.as_slice());
    match boma_qvm::ssh::exec_shell(&conn, cmd)? {}
}
