//! VM lifecycle subcommands: up, start, down, status, list, console, reboot, shutdown, prune.

use boma_qvm::accel::{self, AccelChoice, KvmProbe};
use boma_qvm::paths::Dirs;
use boma_qvm::power::{self, RebootMode, ShutdownOutcome};
use boma_qvm::spec::{self, Boot, VmSpec};
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
    /// Direct kernel boot: the kernel.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: the initrd.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: the kernel command line.
    #[arg(long, requires = "kernel", default_value = "console=ttyS0")]
    pub append: String,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 3072)]
    pub memory: u32,
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
    let name = spec::vm_name(&a.host)?;
    let (accel, warning) = accel::resolve(a.accel, &KvmProbe::read(), a.force_accel)?;
    if let Some(w) = warning {
        eprintln!("{w}");
    }
    let boot = match a.kernel {
        Some(kernel) => {
            for p in std::iter::once(&kernel).chain(a.initrd.iter()) {
                if !p.exists() {
                    return Err(Error::not_found(
                        format!("{}", p.display()),
                        "give an existing kernel/initrd path",
                    ));
                }
            }
            Boot::Kernel {
                kernel,
                initrd: a.initrd,
                append: a.append,
            }
        }
        None => Boot::Disk,
    };
    let mut spec = VmSpec::new(&name, accel, boot);
    spec.host = Some(a.host.clone());
    spec.cpus = a.cpus;
    spec.memory_mib = a.memory;
    spec.console_patterns = a.console_patterns;
    spec.tcg_tb_size_mib = a.tb_size;
    let vm = Vm::create(dirs, &spec)?;
    if let Err(e) = vm.start(&start_options(a.min_free_mib, a.max_vms)).await {
        // Nothing half-made stays behind when it never ran.
        let _ = vm.destroy().await;
        return Err(e);
    }
    println!(
        "{name} is up ({} accel); console: `boma-qvm console {}`",
        accel.as_str(),
        a.host
    );
    Ok(())
}

pub async fn start(dirs: &Dirs, a: VmArg) -> Result<()> {
    let vm = Vm::resolve(dirs, Some(&a.vm))?;
    vm.start(&StartOptions::default()).await?;
    println!("{} is running", vm.name);
    Ok(())
}

pub async fn down(dirs: &Dirs, a: VmArg) -> Result<()> {
    let vm = Vm::resolve(dirs, Some(&a.vm))?;
    let name = vm.name.clone();
    vm.destroy().await?;
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
    if let Some(last) = vm.events()?.last() {
        s.push_str(&format!("  last-event={}", last.event));
    }
    s.push_str(&format!("\n  run dir: {}", vm.run.dir.display()));
    Ok(s)
}

pub fn status(dirs: &Dirs, a: OptVmArg) -> Result<()> {
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
    for vm in vms {
        println!("{}", describe(&vm)?);
    }
    Ok(())
}

pub fn list(dirs: &Dirs) -> Result<()> {
    for name in vm::list(dirs) {
        let vm = Vm::open(dirs, &name)?;
        println!("{name}\t{}", vm.state().as_str());
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
    println!(
        "pruned {} VM(s){}",
        r.vms.len(),
        if r.processes.is_empty() {
            String::new()
        } else {
            format!(", {} stray process(es)", r.processes.len())
        }
    );
    Ok(())
}
