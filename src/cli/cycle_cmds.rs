//! The main job and its pieces: `cycle HOST`, and `apply`, `assert`, `reset` on a kept VM.

use super::vm_cmds::{MachineArgs, NetArgs, image_choice, request};
use boma_qvm::ansible::{CertTier, Playbook};
use boma_qvm::cycle::{self, CycleConfig, steps};
use boma_qvm::machine::provision::{self, OsSource};
use boma_qvm::machine::vm::Vm;
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
    /// Take a snapshot after the apply, so `boma-qvm reset` can re-run reboot + assert.
    #[arg(long)]
    pub snapshot: bool,
    /// Extra vars for both playbooks (repeatable), layered after the overlay and cert tier.
    #[arg(short = 'e', long = "extra-vars")]
    pub extra_vars: Vec<String>,
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
        keep: a.keep,
        snapshot: a.snapshot,
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

/// The kept VM, its cycle config, the ansible session, and a fresh log path in its run dir.
fn kept(dirs: &Dirs, a: &KeptVmArgs, what: &str) -> Result<(Vm, CycleConfig, PathBuf)> {
    let vm = Vm::resolve(dirs, a.vm.as_deref())?;
    let cfg = CycleConfig::load(&vm)?;
    let dir = cfg.run_dir.clone().unwrap_or_else(|| vm.run.dir.clone());
    let stamp = boma_qvm::cycle::config::utc_stamp(boma_qvm::machine::events::now() as u64);
    Ok((vm, cfg, dir.join(format!("{what}-{stamp}.log"))))
}

/// Run one playbook against a kept VM, logging into its cycle's run directory.
async fn kept_playbook(dirs: &Dirs, a: KeptVmArgs, pb: Playbook, what: &str) -> Result<()> {
    let (vm, cfg, log) = kept(dirs, &a, what)?;
    let session = cycle::session(&cfg, &vm, provision::vm_ip(dirs, &vm)?)?;
    boma_qvm::stage::Stages::new()
        .run(what, steps::playbook(&session, pb, &log))
        .await?;
    println!("{what} passed; log: {}", log.display());
    Ok(())
}

pub async fn apply(dirs: &Dirs, a: KeptVmArgs) -> Result<()> {
    kept_playbook(dirs, a, Playbook::Site, "apply").await
}

pub async fn assert(dirs: &Dirs, a: KeptVmArgs) -> Result<()> {
    kept_playbook(dirs, a, Playbook::Verify, "verify").await
}

/// Back to the post-apply snapshot, then reboot + assert again without re-applying.
pub async fn reset(dirs: &Dirs, a: KeptVmArgs) -> Result<()> {
    let (vm, cfg, log) = kept(dirs, &a, "verify-after-reset")?;
    let session = cycle::session(&cfg, &vm, provision::vm_ip(dirs, &vm)?)?;
    let conn = provision::ssh_conn(dirs, &vm)?;
    let mut stages = boma_qvm::stage::Stages::new();
    stages
        .run("restore snapshot", steps::snapshot_load(&vm))
        .await?;
    stages
        .run("reboot", steps::reboot_proven(&vm, &conn))
        .await?;
    stages
        .run(
            "verify after reboot",
            steps::playbook(&session, Playbook::Verify, &log),
        )
        .await?;
    println!(
        "reset: reboot + verify passed in {:.0}s; log: {}",
        stages.total_seconds(),
        log.display()
    );
    Ok(())
}
