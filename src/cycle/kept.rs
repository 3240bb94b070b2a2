//! [`Kept`]: a VM made by `cycle`, with everything its stages need: the machine, the cycle's
//! config (repo, host, cert tier, vars), the Ansible session (transient inventory, vars files),
//! the run directory and the stage records. The cycle composes its steps; `boma-qvm apply`,
//! `verify` and `reset` run the same steps on a kept VM. Each step is one timed stage with one
//! log file in the run directory.

use super::config::{CycleConfig, utc_stamp};
use crate::ansible::{
    Confine, Connection, Playbook, PlaybookOutcome, Profile, RunOptions, Session, SessionConfig,
};
use crate::machine::Machine;
use crate::machine::events::now;
use crate::paths::Dirs;
use crate::stage::Stages;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The name of the post-apply snapshot inside the VM's overlay.
pub const SNAPSHOT: &str = "post-apply";

pub struct Kept {
    pub machine: Machine,
    pub cfg: CycleConfig,
    pub run_dir: PathBuf,
    pub stages: Stages,
    session: Option<Session>,
}

impl Kept {
    /// A VM the cycle just brought up: saves the cycle's config beside it (`cycle.json`) so
    /// the single-step commands find the same repo, host and vars later.
    pub fn new(
        machine: Machine,
        cfg: CycleConfig,
        run_dir: PathBuf,
        stages: Stages,
    ) -> Result<Kept> {
        let mut cfg = cfg;
        cfg.run_dir = Some(run_dir.clone());
        cfg.save(machine.run_dir())?;
        Ok(Kept {
            machine,
            cfg,
            run_dir,
            stages,
            session: None,
        })
    }

    /// A VM kept by an earlier cycle (by name, or the only one).
    pub fn open(dirs: &Dirs, vm: Option<&str>) -> Result<Kept> {
        let machine = Machine::resolve(dirs, vm)?;
        let cfg = CycleConfig::load(machine.run_dir(), machine.name())?;
        let run_dir = cfg
            .run_dir
            .clone()
            .unwrap_or_else(|| machine.run_dir().to_path_buf());
        Ok(Kept {
            machine,
            cfg,
            run_dir,
            stages: Stages::new(),
            session: None,
        })
    }

    pub fn host(&self) -> &str {
        &self.cfg.host
    }

    /// `<run dir>/<what>.log`, or `<what>-<UTC stamp>.log` when that one exists (a step run
    /// again on a kept VM never overwrites the cycle's own log).
    pub fn log(&self, what: &str) -> PathBuf {
        let slug = what.replace(' ', "-");
        let first = self.run_dir.join(format!("{slug}.log"));
        if !first.exists() {
            return first;
        }
        self.run_dir
            .join(format!("{slug}-{}.log", utc_stamp(now() as u64)))
    }

    /// The Ansible session, made on first use (the transient inventory, timed as its stage).
    async fn session(&mut self) -> Result<&Session> {
        if self.session.is_none() {
            let (cfg, machine) = (&self.cfg, &self.machine);
            let s = self
                .stages
                .run("transient inventory", async { session(cfg, machine) })
                .await?;
            self.session = Some(s);
        }
        Ok(self.session.as_ref().expect("just made"))
    }

    /// Run a playbook limited to the VM (the session checks the scope first) as stage `what`,
    /// streaming to the terminal and its log. A failed playbook is an error.
    async fn playbook(&mut self, pb: Playbook, what: &str) -> Result<PlaybookOutcome> {
        let log = self.log(what);
        self.session().await?;
        let session = self.session.as_ref().expect("made above");
        self.stages.run(what, play(session, pb, &log)).await
    }

    /// `ansible-playbook site.yml`.
    pub async fn apply(&mut self) -> Result<PlaybookOutcome> {
        self.playbook(Playbook::Site, "apply").await
    }

    /// `ansible-playbook tests/integration/verify.yml`, as stage `what` ("verify before
    /// reboot", "verify after reboot", "verify").
    pub async fn verify(&mut self, what: &str) -> Result<PlaybookOutcome> {
        self.playbook(Playbook::Verify, what).await
    }

    /// The proven clean reboot (`Machine::reboot`), with its two halves recorded as stages of
    /// their own. No SSH after the reboot is reported as what it is: the incident signature.
    pub async fn reboot(&mut self) -> Result<()> {
        let m = &self.machine;
        let host = self.cfg.host.clone();
        let r = self
            .stages
            .run("reboot", async {
                m.reboot().await.map_err(|e| match e.inner() {
                    Error::Timeout { .. } => Error::verify_failed(
                        format!("no SSH after the reboot ({e})"),
                        format!(
                            "this is the incident signature (a host that does not come back after \
                             a reboot): read the console log in the run directory, or attach with \
                             `boma-qvm console {host}`"
                        ),
                    ),
                    _ => e,
                })
            })
            .await?;
        self.stages
            .record("reboot: guest shutdown", r.shutdown_secs);
        self.stages.record("reboot: boot to SSH", r.boot_secs);
        Ok(())
    }

    /// Save the post-apply snapshot (RAM and disk) that `reset` goes back to.
    pub async fn snapshot(&mut self) -> Result<()> {
        let m = &self.machine;
        self.stages.run("snapshot", m.snapshot_save(SNAPSHOT)).await
    }

    /// Back to the post-apply snapshot, then reboot and verify again, without re-applying.
    pub async fn reset(&mut self) -> Result<()> {
        let m = &self.machine;
        self.stages
            .run("restore snapshot", m.snapshot_load(SNAPSHOT))
            .await?;
        self.reboot().await?;
        self.verify("verify after reboot").await?;
        Ok(())
    }
}

/// The Ansible session for the VM: the transient inventory and vars files in its run dir.
/// Every Ansible process of the session runs confined to the VM's network and loopback
/// (ADR-026): through netd when netd runs that network, else on this state's bridge.
pub fn session(cfg: &CycleConfig, m: &Machine) -> Result<Session> {
    let confine = confinement(m)?;
    let profile = Profile::load_confined(&cfg.repo, &cfg.host, Some(&confine))?;
    Session::new(
        profile,
        SessionConfig {
            dir: m.run_dir().join("ansible"),
            target: Connection::new(m.ip()?, m.conn()?.key),
            subnet: cfg.subnet,
            certs: cfg.cert_plan()?,
            extra_vars: cfg.extra_vars.clone(),
            confine: Some(confine),
        },
    )
}

/// How `m`'s Ansible runs are confined.
pub fn confinement(m: &Machine) -> Result<Confine> {
    Ok(Confine {
        exe: m.start.exe.clone(),
        state: m.dirs().state.clone(),
        netd: m
            .net_access()?
            .and_then(|a| a.socket().map(std::path::Path::to_path_buf)),
        loopback_only: false,
    })
}

async fn play(session: &Session, pb: Playbook, log: &Path) -> Result<PlaybookOutcome> {
    let opts = RunOptions {
        log: log.to_path_buf(),
        timeout: pb.default_timeout(),
        echo: true,
    };
    let out = session.run_playbook(pb, &opts).await?;
    tracing::info!("{}", out.summary());
    out.into_result()
}
