//! `boma-qvm cycle HOST`: the VM becomes HOST (its real inventory vars plus an explicit overlay),
//! gets the real apply, a real reboot over QMP, and the outcome-based verify — before and after
//! the reboot. On failure the VM is kept and a post-mortem is written; on success everything is
//! destroyed. Every stage is timed; every run writes report.json and junit.xml.
//!
//! The steps are [`Kept`]'s methods; `run` composes them, and `boma-qvm apply`, `verify` and
//! `reset` run the same ones on a kept VM.

pub mod config;
pub mod diagnostics;
pub mod kept;
pub mod preflight;
pub mod report;

use crate::machine::{Machine, OsSource, UpRequest};
use crate::paths::Dirs;
use crate::stage::Stages;
use crate::{Error, Result};
pub use config::CycleConfig;
pub use kept::{Kept, SNAPSHOT};
use report::{Report, Verdict};
use std::path::Path;

/// The whole cycle. `req` carries the machine (image, size, accelerator, network); the profile's
/// overlay adds the names that must resolve to the VM.
pub async fn run(dirs: &Dirs, mut cfg: CycleConfig, mut req: UpRequest) -> Result<Report> {
    let mut stages = Stages::new();
    // Refuse bad input before booting anything or making a run directory.
    stages
        .run("input checks", async {
            preflight::check(dirs, &mut cfg, &mut req)
        })
        .await?;
    let run_dir = cfg.new_run_dir()?;
    tracing::info!("run directory: {}", run_dir.display());

    let machine = match Machine::up_staged(dirs, &req, &mut stages).await {
        Ok(m) => m,
        Err(e) => {
            // A VM that booted and then failed (no lease, no SSH) is kept: it explains itself.
            let m = Machine::attach(dirs, &cfg.host).ok();
            return finish(&cfg, &run_dir, stages, m, Some(e), &req).await;
        }
    };
    let mut kept = Kept::new(machine, cfg, run_dir, stages)?;
    let outcome = steps(&mut kept).await.err();
    let Kept {
        machine,
        cfg,
        run_dir,
        stages,
        ..
    } = kept;
    finish(&cfg, &run_dir, stages, Some(machine), outcome, &req).await
}

/// apply -> verify -> (snapshot) -> proven reboot -> verify.
async fn steps(k: &mut Kept) -> Result<()> {
    k.apply().await?;
    let before = k.verify("verify before reboot").await;
    if k.cfg.snapshot {
        k.snapshot().await?;
    }
    k.reboot().await?;
    let after = k.verify("verify after reboot").await;
    // Both verifies are reported; the one after the reboot is the point of the tool.
    after?;
    before?;
    Ok(())
}

/// Write the report (always), the post-mortem (on failure), and keep or destroy the VM.
async fn finish(
    cfg: &CycleConfig,
    run_dir: &Path,
    mut stages: Stages,
    m: Option<Machine>,
    failure: Option<Error>,
    req: &UpRequest,
) -> Result<Report> {
    // Only a VM that exists can be kept; a failure before one was made keeps nothing.
    let keep = m.is_some() && (failure.is_some() || cfg.keep);
    // Secrets out of everything written from here on, and out of what the VM's own files hold.
    let scrubber = cfg.scrubber();
    let failure = failure.map(|e| scrubber.error(e));
    if let (Some(_), Some(m)) = (&failure, &m) {
        let _ = stages
            .run("post-mortem", diagnostics::collect(m, run_dir, &scrubber))
            .await;
    }
    let versions = config::versions(m.as_ref());
    let inspect = keep.then(|| diagnostics::inspect_text(&cfg.host, run_dir));
    if let Some(text) = &inspect {
        scrubber.write(&run_dir.join("INSPECT.txt"), text).ok();
    }
    match (keep, m) {
        (false, Some(m)) => stages.run("teardown", m.down()).await?,
        (true, Some(m)) => kept::mask_vm_files(&m, &scrubber),
        (_, None) => {}
    }
    let summary = match &failure {
        None => "all checks passed across the reboot".to_string(),
        Some(e) => e.to_string(),
    };
    let report = Report {
        host: cfg.host.clone(),
        vm: crate::machine::spec::vm_name(&cfg.host)?,
        verdict: if failure.is_none() {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        summary,
        stages: stages.records.clone(),
        accel: req.accel.as_str().into(),
        certs: cfg.certs.as_str().into(),
        egress: req.egress,
        extra_vars: cfg.extra_vars.clone(),
        secret_vars: cfg.secret_vars.clone(),
        versions,
        image: report::ImageReport {
            name: match &req.os {
                OsSource::Image(c) => c.name().to_string(),
                OsSource::Kernel { .. } => String::new(),
            },
            reason: req.image_reason.clone(),
        },
        accepted_risk: cfg.cert_plan().ok().and_then(|p| p.accepted_risk),
        vm_kept: keep,
        inspect: inspect.clone(),
        total_seconds: stages.total_seconds(),
    }
    .scrubbed(&scrubber);
    report.write(run_dir)?;
    print_summary(&report, run_dir);
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

fn print_summary(r: &Report, run_dir: &Path) {
    eprintln!(
        "\n== boma-qvm cycle {}: {} in {:.0}s",
        r.host,
        if r.verdict == Verdict::Pass {
            "PASS"
        } else {
            "FAIL"
        },
        r.total_seconds
    );
    for s in &r.stages {
        eprintln!(
            "   {:<24} {:>7.1}s  {}",
            s.name,
            s.seconds,
            if s.ok { "ok" } else { "FAILED" }
        );
    }
    if let Some(i) = &r.inspect {
        eprintln!("\n{i}");
    }
    eprintln!("report: {}/report.json", run_dir.display());
}
