//! `boma-qvm cycle HOST`: the VM becomes HOST (its real inventory vars plus an explicit overlay),
//! gets the real apply, a real reboot over QMP, and the outcome-based verify — before and after
//! the reboot. On failure the VM is kept and a post-mortem is written; on success everything is
//! destroyed. Every stage is timed; every run writes report.json and junit.xml.
//!
//! The steps are [`Kept`]'s methods; `run` composes them, and `boma-qvm apply`, `verify` and
//! `reset` run the same ones on a kept VM.

pub mod config;
pub mod diagnostics;
pub mod drift;
pub mod kept;
pub mod preflight;
pub mod report;

use crate::error::FailureClass;
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
            let outcome = Outcome {
                failure: Some(e),
                ..Outcome::default()
            };
            return finish(&cfg, &run_dir, stages, m, outcome, &req).await;
        }
    };
    let mut kept = Kept::new(machine, cfg, run_dir, stages)?;
    let failure = steps(&mut kept).await.err();
    let Kept {
        machine,
        cfg,
        run_dir,
        stages,
        reboot_diff,
        class,
        ..
    } = kept;
    let outcome = Outcome {
        failure,
        class,
        reboot_diff,
    };
    finish(&cfg, &run_dir, stages, Some(machine), outcome, &req).await
}

/// apply -> verify -> state before -> (snapshot) -> proven reboot -> state after and what the
/// reboot changed -> verify. No SSH after the apply or the reboot is a lockout.
async fn steps(k: &mut Kept) -> Result<()> {
    if let Err(e) = k.apply().await {
        return Err(k.lockout_or(e).await);
    }
    let before = if k.cfg.verify_before_reboot {
        match k.verify("verify before reboot").await {
            Ok(_) => Ok(()),
            Err(e) => match k.lockout_or(e).await {
                e if matches!(e.inner(), Error::Lockout { .. }) => return Err(e),
                e => Err(e),
            },
        }
    } else {
        Ok(())
    };
    k.state_before = Some(k.snapshot_state("before reboot", false).await);
    if k.cfg.snapshot {
        k.snapshot().await?;
    }
    k.reboot_and_diff().await?;
    let after = k.verify("verify after reboot").await;
    // Both verifies are reported; the one after the reboot is the point of the tool.
    after?;
    before?;
    Ok(())
}

/// How the steps ended.
#[derive(Default)]
struct Outcome {
    failure: Option<Error>,
    /// The class a step decided (a playbook that ran and failed, a lockout).
    class: Option<FailureClass>,
    reboot_diff: Option<drift::StateDiff>,
}

/// The class of a cycle's failure: what a step decided, else the error's own class, except
/// that an Ansible error outside a playbook run is a safety stop or a tool failure (input/tool).
pub fn classify(decided: Option<FailureClass>, e: &Error) -> FailureClass {
    if let Some(c) = decided {
        return c;
    }
    match e.inner() {
        Error::Ansible { .. } => FailureClass::Input,
        other => other.class(),
    }
}

/// Write the report (always), the post-mortem (on failure), and keep or destroy the VM.
async fn finish(
    cfg: &CycleConfig,
    run_dir: &Path,
    mut stages: Stages,
    m: Option<Machine>,
    outcome: Outcome,
    req: &UpRequest,
) -> Result<Report> {
    let Outcome {
        failure,
        class,
        reboot_diff,
    } = outcome;
    let class = failure.as_ref().map(|e| classify(class, e));
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
    let m_events = m.as_ref().and_then(|m| m.events().ok());
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
    let exit_code = match (&failure, class) {
        (Some(e), Some(c)) => c.exit_code(e.exit_code()),
        _ => 0,
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
            start: start_of(m_events.as_deref()),
        },
        accepted_risk: cfg.cert_plan().ok().and_then(|p| p.accepted_risk),
        vm_kept: keep,
        inspect: inspect.clone(),
        class,
        exit_code,
        retries: stages.retries.clone(),
        reboot_diff,
        total_seconds: stages.total_seconds(),
    }
    .scrubbed(&scrubber);
    report.write(run_dir)?;
    print_summary(&report, run_dir);
    match (failure, class) {
        (Some(e), Some(c)) => Err(e.classified(c)),
        (Some(e), None) => Err(e),
        (None, _) => Ok(report),
    }
}

/// `warm: restored from DIR` when the VM's first start restored a saved state, else `cold`
/// (or empty when no VM was made).
fn start_of(events: Option<&[crate::machine::events::Record]>) -> String {
    use crate::machine::events::names;
    let Some(events) = events else {
        return String::new();
    };
    let first = events
        .iter()
        .find(|r| r.is(names::RESTORED) || r.is(names::QEMU_STARTED));
    match first {
        Some(r) if r.is(names::RESTORED) => {
            let from = std::path::Path::new(r.data["from"].as_str().unwrap_or(""));
            format!(
                "warm: restored from {}",
                from.parent().unwrap_or(from).display()
            )
        }
        Some(_) => "cold".into(),
        None => String::new(),
    }
}

fn print_summary(r: &Report, run_dir: &Path) {
    let verdict = match (r.verdict, r.class) {
        (Verdict::Pass, _) => "PASS".to_string(),
        (Verdict::Fail, Some(c)) => format!("FAIL ({}, exit {})", c.as_str(), r.exit_code),
        (Verdict::Fail, None) => "FAIL".to_string(),
    };
    eprintln!(
        "\n== boma-qvm cycle {}: {verdict} in {:.0}s",
        r.host, r.total_seconds
    );
    if !r.image.start.is_empty() {
        eprintln!("   first boot: {}", r.image.start);
    }
    for s in &r.stages {
        eprintln!(
            "   {:<26} {:>7.1}s  {}",
            s.name,
            s.seconds,
            match (s.ok, s.retried) {
                (true, _) => "ok",
                (false, true) => "FAILED, retried",
                (false, false) => "FAILED",
            }
        );
    }
    for t in &r.retries {
        eprintln!("   retried: {}", t.reason.lines().next().unwrap_or(""));
    }
    if let Some(c) = r.class {
        eprintln!("\n   class: {}: {}", c.as_str(), c.meaning());
    }
    if let Some(d) = &r.reboot_diff {
        eprintln!("\n{}", d.render(12));
    }
    if let Some(i) = &r.inspect {
        eprintln!("\n{i}");
    }
    eprintln!("report: {}/report.json", run_dir.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_their_exit_codes() {
        let cases = [
            (
                None,
                Error::verify_failed("port dead", "fix"),
                FailureClass::Test,
                14,
            ),
            (
                Some(FailureClass::Test),
                Error::ansible("site.yml failed", "f"),
                FailureClass::Test,
                14,
            ),
            (
                None,
                Error::ansible("refusing to run: two hosts", "f"),
                FailureClass::Input,
                13,
            ),
            (
                None,
                Error::Lockout {
                    problem: "no SSH".into(),
                    fix: "f".into(),
                },
                FailureClass::Lockout,
                16,
            ),
            (
                None,
                Error::timeout("a DHCP lease", 300, "").with_evidence("console", "x"),
                FailureClass::Infrastructure,
                20,
            ),
            (
                None,
                Error::qemu("QEMU exited", "f"),
                FailureClass::Infrastructure,
                20,
            ),
            (
                None,
                Error::not_found("the repo", "f"),
                FailureClass::Input,
                4,
            ),
            (None, Error::input("bad", "f"), FailureClass::Input, 2),
        ];
        for (decided, e, class, code) in cases {
            let c = classify(decided, &e);
            assert_eq!(c, class, "{e}");
            let e = e.classified(c);
            assert_eq!(e.exit_code(), code, "{e}");
            assert!(!matches!(e.inner(), Error::Classified { .. }));
        }
    }
}
