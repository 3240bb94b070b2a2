//! `boma-qvm cycle HOST`: the VM becomes HOST (its real inventory vars plus an explicit overlay),
//! gets the real apply, a real reboot over QMP, and the outcome-based verify — before and after
//! the reboot. On failure the VM is kept and a post-mortem is written; on success everything is
//! destroyed. Every stage is timed; every run writes report.json and junit.xml.

pub mod config;
pub mod diagnostics;
pub mod preflight;
pub mod report;
pub mod steps;

use crate::ansible::{Connection, Playbook, Profile, Session, SessionConfig};
use crate::machine::provision::{self, UpRequest};
use crate::machine::vm::Vm;
use crate::paths::Dirs;
use crate::stage::Stages;
use crate::{Error, Result, guest::ssh};
pub use config::CycleConfig;
use report::{Report, Verdict};
use std::net::Ipv4Addr;

/// The ansible session for a VM: the transient inventory and vars files live in its run dir.
pub fn session(cfg: &CycleConfig, vm: &Vm, ip: Ipv4Addr) -> Result<Session> {
    let profile = Profile::load(&cfg.repo, &cfg.host)?;
    let certs = cfg.cert_plan()?;
    Session::new(
        profile,
        SessionConfig {
            dir: vm.run.dir.join("ansible"),
            target: Connection::new(ip, vm.run.ssh_key()),
            subnet: cfg.subnet,
            certs,
            extra_vars: cfg.extra_vars.clone(),
        },
    )
}

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
    let cfg = &cfg;
    let run_dir = cfg.new_run_dir()?;
    tracing::info!("run directory: {}", run_dir.display());

    let up = match provision::up(dirs, &req, &mut stages).await {
        Ok(up) => up,
        Err(e) => {
            let vm = Vm::open(dirs, &crate::machine::spec::vm_name(&cfg.host)?).ok();
            return finish(cfg, &run_dir, stages, vm, None, Some(e), &req).await;
        }
    };
    let vm = up.vm;
    let ip = up.ip.ok_or_else(|| {
        Error::network("the VM has no address", "cycle needs the isolated network")
    })?;
    let conn = ssh::Conn::new(ip.to_string(), vm.run.ssh_key());
    cfg.save(&vm, &run_dir)?;

    let body = async {
        let session = stages
            .run("transient inventory", async { session(cfg, &vm, ip) })
            .await?;
        stages
            .run(
                "apply",
                steps::playbook(&session, Playbook::Site, &run_dir.join("apply.log")),
            )
            .await?;
        let before = stages
            .run(
                "verify before reboot",
                steps::playbook(
                    &session,
                    Playbook::Verify,
                    &run_dir.join("verify-before-reboot.log"),
                ),
            )
            .await;
        if cfg.snapshot {
            stages.run("snapshot", steps::snapshot_save(&vm)).await?;
        }
        stages
            .run("reboot", steps::reboot_proven(&vm, &conn))
            .await?;
        let after = stages
            .run(
                "verify after reboot",
                steps::playbook(
                    &session,
                    Playbook::Verify,
                    &run_dir.join("verify-after-reboot.log"),
                ),
            )
            .await;
        // Both verifies are reported; the one after the reboot is the point of the tool.
        after?;
        before?;
        Ok::<(), Error>(())
    };
    let outcome = body.await.err();
    finish(cfg, &run_dir, stages, Some(vm), Some(&conn), outcome, &req).await
}

/// Write the report (always), the post-mortem (on failure), and keep or destroy the VM.
async fn finish(
    cfg: &CycleConfig,
    run_dir: &std::path::Path,
    mut stages: Stages,
    vm: Option<Vm>,
    conn: Option<&ssh::Conn>,
    failure: Option<Error>,
    req: &UpRequest,
) -> Result<Report> {
    // Only a VM that exists can be kept; a failure before one was made keeps nothing.
    let keep = vm.is_some() && (failure.is_some() || cfg.keep);
    if let (Some(_), Some(vm)) = (&failure, &vm) {
        let _ = stages
            .run("post-mortem", diagnostics::collect(vm, conn, run_dir))
            .await;
    }
    let versions = config::versions(vm.as_ref());
    let inspect = keep.then(|| diagnostics::inspect_text(&cfg.host, run_dir));
    if let Some(text) = &inspect {
        std::fs::write(run_dir.join("INSPECT.txt"), text).ok();
    }
    if let (false, Some(vm)) = (keep, vm) {
        stages.run("teardown", provision::teardown(vm)).await?;
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
        versions,
        image: report::ImageReport {
            name: match &req.os {
                provision::OsSource::Image(c) => c.name().to_string(),
                provision::OsSource::Kernel { .. } => String::new(),
            },
            reason: req.image_reason.clone(),
        },
        accepted_risk: cfg.cert_plan().ok().and_then(|p| p.accepted_risk),
        vm_kept: keep,
        inspect: inspect.clone(),
        total_seconds: stages.total_seconds(),
    };
    report.write(run_dir)?;
    print_summary(&report, run_dir);
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

fn print_summary(r: &Report, run_dir: &std::path::Path) {
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
            "   {:<22} {:>7.1}s  {}",
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
