//! Command-line parsing and dispatch. Each subcommand's work lives in the library; this only maps
//! flags to calls and results to output.

mod cycle_cmds;
mod fault_cmds;
mod net_cmds;
mod vm_cmds;

use boma_qvm::Result;
use boma_qvm::paths::Dirs;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "boma-qvm",
    version,
    about = "Test risky infrastructure changes on a throwaway QEMU VM that mirrors a real host"
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// State directory (run dirs, network state). Default: $XDG_STATE_HOME/boma-qvm.
    #[arg(long, global = true, env = "BOMA_QVM_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Cache directory (golden images). Default: $XDG_CACHE_HOME/boma-qvm.
    #[arg(long, global = true, env = "BOMA_QVM_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The main job: the VM becomes HOST, gets the real apply, a real reboot, the verify playbook.
    Cycle(Box<cycle_cmds::CycleArgs>),
    /// Re-run the apply (site.yml) on a VM kept by `cycle`.
    Apply(cycle_cmds::KeptVmArgs),
    /// Re-run the verify playbook on a VM kept by `cycle`.
    Assert(cycle_cmds::KeptVmArgs),
    /// Restore the post-apply snapshot (`cycle --snapshot`), then reboot + assert again.
    Reset(cycle_cmds::KeptVmArgs),
    /// Create a VM and power it on.
    Up(Box<vm_cmds::UpArgs>),
    /// Power on an existing VM (after a shutdown or power cut), reusing its overlay.
    Start(vm_cmds::VmArg),
    /// Destroy a VM: stop QEMU, remove its run directory and overlay.
    Down(vm_cmds::VmArg),
    /// Show a VM's state (or all VMs).
    Status(vm_cmds::OptVmArg),
    /// List VMs.
    List,
    /// Attach to the serial console (Ctrl-] detaches), or print the captured log.
    Console(vm_cmds::ConsoleArgs),
    /// Reboot over QMP: clean (ACPI power button, then reset) or --hard (reset button).
    Reboot(vm_cmds::RebootArgs),
    /// Clean shutdown over QMP; QEMU is stopped if the guest does not power off in time.
    Shutdown(vm_cmds::ShutdownArgs),
    /// Reap every boma-it-* leftover: QEMU processes, supervisors, sockets, run dirs, overlays,
    /// and the network (dnsmasq, our nft table, bridge, taps).
    Prune,
    /// Open a shell on the VM (as `ansible`, with the run's key), or run a command: `ssh VM -- CMD`.
    Ssh(vm_cmds::SshArgs),
    /// Golden images: pull, build, import, list, rm.
    #[command(subcommand)]
    Image(boma_qvm::image::cli::ImageCmd),
    /// The isolated network: up, down, status.
    #[command(subcommand)]
    Net(net_cmds::NetCmd),
    /// Check the host: KVM, tools, the Ansible it will run, and firewall tables that would eat the
    /// VMs' traffic; --boot-test also boots a tiny guest to prove the accelerator.
    Doctor(net_cmds::DoctorArgs),
    /// Inject a fault into a running VM: power-cut, power-on, reset, link-down, freeze, disk-errors-on, egress-off, nmi, ...
    Fault(fault_cmds::FaultArgs),
    /// Internal: the per-VM supervisor process.
    #[command(name = "__supervise", hide = true)]
    Supervise {
        run_dir: PathBuf,
        #[arg(long = "keep-fd")]
        keep_fd: Vec<i32>,
    },
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "boma_qvm=info,warn",
        1 => "boma_qvm=debug,info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BOMA_QVM_LOG")
        .unwrap_or_else(|_| level.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

pub fn main() -> i32 {
    // SAFETY: first thing in main, before any thread exists.
    unsafe { boma_qvm::config_file::apply(&boma_qvm::config_file::path()) };
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let mut dirs = Dirs::from_env();
    if let Some(s) = cli.state_dir {
        dirs.state = s;
    }
    if let Some(c) = cli.cache_dir {
        dirs.cache = c;
    }
    let result = match cli.cmd {
        Cmd::Supervise {
            run_dir,
            keep_fd: _,
        } => supervise(run_dir),
        cmd => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(dispatch(cmd, &dirs))
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// The supervisor runs on a current-thread runtime: QEMU's parent-death signal is tied to the
/// thread that spawned it, so that thread must live as long as the supervisor.
fn supervise(run_dir: PathBuf) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(boma_qvm::supervisor::main(boma_qvm::rundir::RunDir::new(
        run_dir,
    )))
}

async fn dispatch(cmd: Cmd, dirs: &Dirs) -> Result<()> {
    match cmd {
        Cmd::Cycle(a) => cycle_cmds::cycle(dirs, *a).await,
        Cmd::Apply(a) => cycle_cmds::apply(dirs, a).await,
        Cmd::Assert(a) => cycle_cmds::assert(dirs, a).await,
        Cmd::Reset(a) => cycle_cmds::reset(dirs, a).await,
        Cmd::Up(a) => vm_cmds::up(dirs, *a).await,
        Cmd::Start(a) => vm_cmds::start(dirs, a).await,
        Cmd::Down(a) => vm_cmds::down(dirs, a).await,
        Cmd::Status(a) => vm_cmds::status(dirs, a).await,
        Cmd::List => vm_cmds::list(dirs),
        Cmd::Console(a) => vm_cmds::console(dirs, a).await,
        Cmd::Reboot(a) => vm_cmds::reboot(dirs, a).await,
        Cmd::Shutdown(a) => vm_cmds::shutdown(dirs, a).await,
        Cmd::Prune => vm_cmds::prune(dirs).await,
        Cmd::Ssh(a) => vm_cmds::ssh(dirs, a),
        Cmd::Image(c) => boma_qvm::image::cli::run(dirs, c).await,
        Cmd::Net(c) => net_cmds::net(dirs, c).await,
        Cmd::Doctor(a) => net_cmds::doctor(dirs, a).await,
        Cmd::Fault(a) => fault_cmds::fault(dirs, a).await,
        Cmd::Supervise { .. } => unreachable!("handled before the runtime"),
    }
}
