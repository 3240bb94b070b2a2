//! Command-line parsing and dispatch. Each subcommand's work lives in the library; this only maps
//! flags to calls and results to output.

mod cycle_cmds;
mod fault_cmds;
mod image_cmds;
mod net_cmds;
mod vm_cmds;

use boma_qvm::paths::{DirKind, DirOrigin, Dirs};
use boma_qvm::{Result, settings};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    /// Re-run the verify playbook on a VM kept by `cycle` (`assert` is an alias).
    #[command(alias = "assert")]
    Verify(cycle_cmds::KeptVmArgs),
    /// Back to the post-apply state from its memory snapshot (`cycle --snapshot`): no re-apply,
    /// no boot; then the real reboot + verify again.
    Reset(cycle_cmds::KeptVmArgs),
    /// What changed on a VM kept by `cycle` since its apply: its state now (nft ruleset,
    /// listeners, units, containers, routes, sysctls, mounts) against the post-apply state.
    Diff(cycle_cmds::KeptVmArgs),
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
    Image(image_cmds::ImageCmd),
    /// The isolated network: up, down, status.
    #[command(subcommand)]
    Net(net_cmds::NetCmd),
    /// Check the host: KVM, tools, the Ansible it will run, and firewall tables that would eat the
    /// VMs' traffic; --boot-test also boots a tiny guest to prove the accelerator.
    Doctor(net_cmds::DoctorArgs),
    /// Inject a fault into a running VM: power-cut, power-on, reset, link-down, freeze, disk-errors-on, egress-off, nmi, ...
    Fault(fault_cmds::FaultArgs),
    /// The privileged network daemon (root): runs the shared VM network for unprivileged users
    /// on a unix socket (group boma-qvm); installed as boma-qvm-netd.service by the role.
    Netd(net_cmds::NetdArgs),
    /// Internal: run a command confined to the VM network and loopback (the cycle's Ansible).
    #[command(name = "__confined", hide = true)]
    Confined {
        /// netd's socket (the VM's network is netd's); without it, root builds the veth itself.
        #[arg(long)]
        netd: Option<PathBuf>,
        /// No veth: loopback only.
        #[arg(long)]
        loopback_only: bool,
        #[arg(last = true, required = true)]
        cmd: Vec<std::ffi::OsString>,
    },
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
    // Colour only for a person at a terminal: logs piped to a file or CI stay plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false)
        .init();
}

pub fn main() -> i32 {
    // The supervisor inherits the settings from the CLI that started it.
    let supervising = std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "__supervise");
    if !supervising {
        match boma_qvm::config_file::load() {
            Ok(warnings) => {
                for w in warnings {
                    eprintln!("warning: {w}");
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                return e.exit_code();
            }
        }
    }
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return clap_failed(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => return clap_failed(e),
    };
    init_logging(cli.verbose);
    let typed = |m: &clap::ArgMatches, id: &str| {
        m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    };
    let mut dirs = Dirs::from_env();
    if let Some(s) = cli.state_dir {
        dirs.state = s;
        if typed(&matches, "state_dir") {
            dirs.origins.state = DirOrigin::Flag;
        }
    }
    if let Some(c) = cli.cache_dir {
        dirs.cache = c;
        if typed(&matches, "cache_dir") {
            dirs.origins.cache = DirOrigin::Flag;
        }
    }
    if let Cmd::Cycle(a) = &cli.cmd
        && let Some(r) = &a.runs_dir
    {
        dirs.runs = r.clone();
        if matches
            .subcommand_matches("cycle")
            .is_some_and(|m| typed(m, "runs_dir"))
        {
            dirs.origins.runs = DirOrigin::Flag;
        }
    }
    if let Err(e) = preflight(&cli.cmd, &dirs) {
        eprintln!("error: {e}");
        return e.exit_code();
    }
    let state_typed = dirs.origins.state == DirOrigin::Flag;
    let result = match cli.cmd {
        Cmd::Supervise {
            run_dir,
            keep_fd: _,
        } => supervise(run_dir),
        // Before any thread exists: it forks, and its child unshares a user namespace.
        Cmd::Confined {
            netd,
            loopback_only,
            cmd,
        } => {
            return match boma_qvm::net::confine::run(boma_qvm::net::confine::Options {
                dirs: dirs.clone(),
                netd,
                loopback_only,
                argv: cmd,
            }) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e}");
                    e.exit_code()
                }
            };
        }
        Cmd::Netd(a) => net_cmds::netd(&dirs, state_typed, a),
        cmd => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            let caught = Interruptible::of(&cmd);
            let outcome = rt.block_on(async {
                match caught {
                    None => Ok(dispatch(cmd, &dirs).await),
                    Some(what) => interruptible(what, dispatch(cmd, &dirs), &dirs).await,
                }
            });
            match outcome {
                Ok(r) => r,
                Err(code) => {
                    // A blocking task (a lock wait, a hash) must not hold the exit up.
                    rt.shutdown_timeout(std::time::Duration::from_secs(2));
                    return code;
                }
            }
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

/// clap's own error, unless a bad setting is behind it: clap names the flag (`--min-free-mib`)
/// even when the value came from `BOMA_QVM_MIN_FREE_MIB` in config.env, so say that instead.
fn clap_failed(e: clap::Error) -> i32 {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        let problems = settings::check();
        if !problems.is_empty() {
            for p in &problems {
                eprintln!("error: {}", p.error());
            }
            return 2;
        }
    }
    e.exit()
}

/// Before any work: the settings (a command that only inspects or cleans up warns about a bad
/// one, so a typo never blocks `down` or `prune`; the others refuse; `doctor` reports them), and
/// the directories the command uses.
fn preflight(cmd: &Cmd, dirs: &Dirs) -> Result<()> {
    use image_cmds::ImageCmd;
    use net_cmds::NetCmd;
    let inspects_or_cleans = matches!(
        cmd,
        Cmd::Down(_)
            | Cmd::Prune
            | Cmd::Status(_)
            | Cmd::List
            | Cmd::Console(_)
            | Cmd::Ssh(_)
            | Cmd::Shutdown(_)
            | Cmd::Net(NetCmd::Down | NetCmd::Status)
            | Cmd::Image(ImageCmd::List | ImageCmd::Rm { .. })
    );
    if !matches!(
        cmd,
        Cmd::Doctor(_) | Cmd::Supervise { .. } | Cmd::Netd(_) | Cmd::Confined { .. }
    ) {
        let mut problems: Vec<_> = settings::check().iter().map(|p| p.error()).collect();
        if inspects_or_cleans {
            for p in &problems {
                eprintln!("warning: {}", p.to_string().replace("\n  ", "; "));
            }
        } else if let Some(last) = problems.pop() {
            for p in problems {
                eprintln!("error: {p}");
            }
            return Err(last);
        }
    }
    let (state, cache, runs) = (DirKind::State, DirKind::Cache, DirKind::Runs);
    let uses: &[(DirKind, bool)] = match cmd {
        // The cache is read here: an operator uses the shared cache's images and keeps warm
        // templates in their state directory; adding a missing image is checked with it.
        Cmd::Cycle(_) => &[(state, true), (cache, false), (runs, true)],
        Cmd::Up(a) if a.kernel.is_some() => &[(state, true)],
        Cmd::Up(_) => &[(state, true), (cache, false)],
        Cmd::Start(_) | Cmd::Apply(_) | Cmd::Verify(_) | Cmd::Reset(_) | Cmd::Diff(_) => {
            &[(state, true)]
        }
        Cmd::Net(NetCmd::Up { .. }) => &[(state, true)],
        Cmd::Net(_)
        | Cmd::Down(_)
        | Cmd::Status(_)
        | Cmd::List
        | Cmd::Console(_)
        | Cmd::Reboot(_)
        | Cmd::Shutdown(_)
        | Cmd::Ssh(_)
        | Cmd::Fault(_) => &[(state, false)],
        Cmd::Prune => &[(state, false), (cache, false)],
        Cmd::Image(ImageCmd::List) => &[(cache, false)],
        Cmd::Image(_) => &[(cache, true)],
        Cmd::Doctor(_) | Cmd::Supervise { .. } | Cmd::Netd(_) | Cmd::Confined { .. } => &[],
    };
    for (kind, write) in uses {
        dirs.check(*kind, *write)?;
    }
    Ok(())
}

/// Commands that catch SIGINT and SIGTERM instead of dying on the spot: the command's work is
/// dropped, so its destructors clean up (a staging directory, a half-built root filesystem,
/// child tools), and the user is told what is left and how to reap it. Exit 130 (SIGINT) or
/// 143 (SIGTERM), as a shell reports a death by that signal.
///
/// A VM that `up`, `cycle` or `start` already booted is kept, running, on purpose: a Ctrl-C
/// during a slow boot is how one looks at it (`console --log`); the message says it is there
/// and that `down HOST` removes it.
enum Interruptible {
    Image,
    /// `up`/`cycle`/`start` of this host (or VM name).
    Vm {
        verb: &'static str,
        host: String,
    },
}

impl Interruptible {
    fn of(cmd: &Cmd) -> Option<Interruptible> {
        let vm = |verb, host: &str| {
            Some(Interruptible::Vm {
                verb,
                host: host.to_string(),
            })
        };
        match cmd {
            Cmd::Image(_) => Some(Interruptible::Image),
            Cmd::Up(a) => vm("up", &a.host),
            Cmd::Cycle(a) => vm("cycle", &a.host),
            Cmd::Start(a) => vm("start", &a.vm),
            _ => None,
        }
    }
}

/// Run `work` until it finishes (`Ok`) or SIGINT/SIGTERM arrives (`Err(exit code)`, after
/// saying what is left).
async fn interruptible(
    what: Interruptible,
    work: impl std::future::Future<Output = Result<()>>,
    dirs: &Dirs,
) -> std::result::Result<Result<()>, i32> {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return Ok(work.await); // no signal handling: the default (die) is all we have
    };
    let (name, code) = tokio::select! {
        biased;
        _ = int.recv() => ("SIGINT", 130),
        _ = term.recv() => ("SIGTERM", 143),
        r = work => return Ok(r),
    };
    // `work` is dropped by now: its staging directories and child processes are gone.
    match what {
        Interruptible::Image => {
            let left = match vm_cmds::prune_image_staging(dirs) {
                Ok(s) => s,
                Err(e) => format!("image cache: {e}"),
            };
            eprintln!("interrupted by {name}; nothing was installed in the image cache\n{left}");
        }
        Interruptible::Vm { verb, host } => {
            let left = vm_cmds::left_behind(dirs, &host).await;
            eprintln!("interrupted by {name} during `{verb} {host}`\n{left}");
        }
    }
    Err(code)
}

/// The supervisor runs on a current-thread runtime: QEMU's parent-death signal is tied to the
/// thread that spawned it, so that thread must live as long as the supervisor.
fn supervise(run_dir: PathBuf) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(boma_qvm::machine::supervisor::main(
        boma_qvm::machine::rundir::RunDir::new(run_dir),
    ))
}

async fn dispatch(cmd: Cmd, dirs: &Dirs) -> Result<()> {
    match cmd {
        Cmd::Cycle(a) => cycle_cmds::cycle(dirs, *a).await,
        Cmd::Apply(a) => cycle_cmds::apply(dirs, a).await,
        Cmd::Verify(a) => cycle_cmds::verify(dirs, a).await,
        Cmd::Reset(a) => cycle_cmds::reset(dirs, a).await,
        Cmd::Diff(a) => cycle_cmds::diff(dirs, a).await,
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
        Cmd::Image(c) => image_cmds::run(dirs, c).await,
        Cmd::Net(c) => net_cmds::net(dirs, c).await,
        Cmd::Doctor(a) => net_cmds::doctor(dirs, a).await,
        Cmd::Fault(a) => fault_cmds::fault(dirs, a).await,
        Cmd::Supervise { .. } | Cmd::Netd(_) | Cmd::Confined { .. } => {
            unreachable!("handled before the runtime")
        }
    }
}
