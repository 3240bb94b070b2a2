//! The main job and its pieces: `cycle HOST`, and `apply`, `assert`, `reset` on a kept VM.

use super::vm_cmds::{MachineArgs, NetArgs, image_choice, request};
use boma_qvm::ansible::CertTier;
use boma_qvm::cycle::{self, CycleConfig, Kept};
use boma_qvm::machine::OsSource;
use boma_qvm::paths::Dirs;
use boma_qvm::{Error, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CycleArgs {
    /// The inventory host the VM becomes (e.g. askari).
    pub host: String,
    /// The Ansible repo (inventory, group_vars, host_vars, site.yml, tests/integration/...).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Certificate tier: internal (Caddy `tls internal`), le-staging, le-prod-wildcard.
    #[arg(long, default_value = "internal")]
    pub certs: String,
    /// Required with --certs le-prod-wildcard: accept the recorded risk for this run.
    #[arg(long)]
    pub accept_prod_cert_risk: bool,
    /// Keep the VM even when the cycle passes.
    #[arg(long)]
    pub keep: bool,
    /// Take a memory snapshot after the apply, so `boma-qvm reset` can go back to the
    /// post-apply state in seconds and re-run reboot + verify.
    #[arg(long)]
    pub snapshot: bool,
    /// Do not run verify before the reboot (only the reboot is under test; saves a verify).
    #[arg(long)]
    pub skip_verify_before_reboot: bool,
    /// Extra vars for both playbooks (repeatable), layered after the overlay and cert tier.
    /// Never put a secret here: any user's `ps` shows the command line. Use --secret-var.
    #[arg(short = 'e', long = "extra-vars")]
    pub extra_vars: Vec<String>,
    /// An extra var whose value is secret (repeatable): the value of var NAME is read from the
    /// environment variable NAME (as `docker run -e NAME` does), passed to Ansible in a 0600
    /// file that exists only while a playbook runs, never stored, and scrubbed from every file
    /// the run writes. `apply`, `verify` and `reset` of the kept VM read it again.
    #[arg(long = "secret-var", value_name = "NAME")]
    pub secret_vars: Vec<String>,
    /// Golden image: built (the default: Debian 13 built offline, with Docker and the guest
    /// agent), cloud (Debian's genericcloud: no Docker, no agent), or an imported name.
    #[arg(long)]
    pub image: Option<String>,
    /// Where run directories (report, logs, post-mortem) go.
    #[arg(long, env = "BOMA_QVM_RUNS_DIR")]
    pub runs_dir: Option<PathBuf>,
    #[command(flatten)]
    pub machine: MachineArgs,
    #[command(flatten)]
    pub net: NetArgs,
}

pub async fn cycle(dirs: &Dirs, a: CycleArgs) -> Result<()> {
    let repo = std::fs::canonicalize(&a.repo).map_err(|_| {
        Error::not_found(
            format!("the repo {}", a.repo.display()),
            "give the boma repo with --repo DIR",
        )
    })?;
    let certs: CertTier = a.certs.parse()?;
    let (choice, reason) = image_choice(a.image.as_deref())?;
    let mut req = request(&a.host, OsSource::Image(choice), &a.machine, &a.net)?;
    req.image_reason = reason;
    let net = req.net.clone().ok_or_else(|| {
        Error::input(
            "cycle needs the isolated network",
            "drop --no-net (use --no-egress to cut egress)",
        )
    })?;
    let cfg = CycleConfig {
        host: a.host.clone(),
        repo,
        certs,
        prod_opt_in: a.accept_prod_cert_risk,
        extra_vars: a.extra_vars,
        secret_vars: a.secret_vars,
        keep: a.keep,
        snapshot: a.snapshot,
        verify_before_reboot: !a.skip_verify_before_reboot,
        egress: req.egress,
        subnet: net.subnet,
        runs_root: a.runs_dir.unwrap_or_else(|| dirs.runs.clone()),
        run_dir: None,
    };
    let report = cycle::run(dirs, cfg, req).await?;
    println!("{}: PASS ({})", report.host, report.summary);
    Ok(())
}

#[derive(Args, Debug)]
pub struct KeptVmArgs {
    /// The VM (default: the only one).
    pub vm: Option<String>,
}

/// Run `step` on a kept VM, timed, with its log in the cycle's run directory.
async fn on_kept<F>(dirs: &Dirs, a: KeptVmArgs, what: &str, step: F) -> Result<()>
where
    F: AsyncFnOnce(&mut Kept) -> Result<()>,
{
    let mut k = Kept::open(dirs, a.vm.as_deref())?;
    let r = step(&mut k).await;
    k.scrub(r)?;
    println!(
        "{what} passed on {} in {:.0}s; logs in {}",
        k.machine.name(),
        k.stages.total_seconds(),
        k.run_dir.display()
    );
    Ok(())
}

pub async fn apply(dirs: &Dirs, a: KeptVmArgs) -> Result<()> {
    on_kept(dirs, a, "apply", async |k| k.apply().await.map(drop)).await
}

pub async fn verify(dirs: &Dirs, a: KeptVmArgs) -> Result<()> {
    on_kept(dirs, a, "verify", async |k| {
        k.verify("verify").await.map(drop)
    })
    .await
}

/// The guest's state now against the post-apply state its cycle recorded: what changed since
/// the apply (a reboot, a manual fix, a drift). Exit 0 whatever changed.
pub async fn diff(dirs: &Dirs, a: KeptVmArgs) -> Result<()> {
    let mut k = Kept::open(dirs, a.vm.as_deref())?;
    let d = k.diff().await?;
    println!("{}", d.render(usize::MAX).trim_end());
    println!(
        "{}: diff against the post-apply state written to {}",
        k.machine.name(),
        k.run_dir.display()
    );
    Ok(())
}

/// Back to the post-apply state from its memory snapshot (no re-apply, no boot), then the real
/// reboot + verify again; what the reboot changed is shown whatever the verdict.
pub async fn reset(dirs: &Dirs, a: KeptVmArgs) -> Result<()> {
    on_kept(
        dirs,
        a,
        "reset (restore post-apply state, reboot, verify)",
        async |k| {
            let r = k.reset().await;
            if let Some(d) = &k.reboot_diff {
                eprintln!("\n{}", d.render(12));
            }
            r
        },
    )
    .await
}
