//! [`Kept`]: a VM made by `cycle`, with everything its stages need: the machine, the cycle's
//! config (repo, host, cert tier, vars), the Ansible session (transient inventory, vars files),
//! the run directory and the stage records. The cycle composes its steps; `boma-qvm apply`,
//! `verify` and `reset` run the same steps on a kept VM. Each step is one timed stage with one
//! log file in the run directory.

use super::config::{CycleConfig, utc_stamp};
use super::drift::{self, GuestState, StateDiff};
use crate::ansible::{
    Confine, Connection, Playbook, PlaybookOutcome, Profile, RunOptions, Session, SessionConfig,
};
use crate::error::FailureClass;
use crate::machine::Machine;
use crate::machine::events::now;
use crate::paths::Dirs;
use crate::stage::Stages;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The name of the post-apply snapshot inside the VM's overlay.
pub const SNAPSHOT: &str = "post-apply";
/// The stage of `reset` that restores the post-apply state (what a re-apply would redo).
pub const RESET_STAGE: &str = "reset: restore post-apply state";

/// The guest-state snapshots of a cycle, by the slug of their files in the run directory
/// (`state-before-reboot.json`, ...).
pub const STATE_BEFORE: &str = "before-reboot";
pub const STATE_AFTER: &str = "after-reboot";

pub struct Kept {
    pub machine: Machine,
    pub cfg: CycleConfig,
    pub run_dir: PathBuf,
    pub stages: Stages,
    /// The post-apply state (before the reboot) and the one after it.
    pub state_before: Option<GuestState>,
    pub state_after: Option<GuestState>,
    /// What the reboot changed, once both states are in.
    pub reboot_diff: Option<StateDiff>,
    /// Set when a step's own outcome decides the failure class (a playbook that ran and
    /// failed is a test failure, whatever its error kind).
    pub class: Option<FailureClass>,
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
            state_before: None,
            state_after: None,
            reboot_diff: None,
            class: None,
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
            state_before: None,
            state_after: None,
            reboot_diff: None,
            class: None,
            session: None,
        })
    }

    pub fn host(&self) -> &str {
        &self.cfg.host
    }

    /// `<run dir>/<what>.log`, or `<what>-<UTC stamp>.log` when that one exists (a step run
    /// again on a kept VM never overwrites the cycle's own log).
    pub fn log(&self, what: &str) -> PathBuf {
        let slug = self.unique(&what.replace(' ', "-"), "", ".log");
        self.run_dir.join(format!("{slug}.log"))
    }

    /// `slug`, or `slug-<UTC stamp>` when `<prefix><slug><suffix>` exists in the run directory.
    fn unique(&self, slug: &str, prefix: &str, suffix: &str) -> String {
        if !self
            .run_dir
            .join(format!("{prefix}{slug}{suffix}"))
            .exists()
        {
            return slug.to_string();
        }
        format!("{slug}-{}", utc_stamp(now() as u64))
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
        let ran = std::cell::Cell::new(false);
        let r = self.stages.run(what, play(session, pb, &log, &ran)).await;
        if r.is_err() && ran.get() {
            self.class = Some(FailureClass::Test);
        }
        r
    }

    /// After `e` (a failed apply or verify): if SSH is gone while the guest is alive, the
    /// lockout "after the apply" (with its evidence) instead; otherwise `e`.
    pub async fn lockout_or(&mut self, e: Error) -> Error {
        match self.machine.lockout("after the apply", None).await {
            Some(lockout) => {
                self.class = Some(FailureClass::Lockout);
                lockout
            }
            None => e,
        }
    }

    /// Snapshot the guest's observable state as stage `state <when>` ("before reboot", "after
    /// reboot", "now"); writes `state-<slug>.json` and `.txt`. After a reboot it first waits
    /// (bounded) for the boot to finish, as verify does. `ssh_dead`: go to the agent directly.
    /// Never fails: what could not be read is said in the snapshot.
    pub async fn snapshot_state(&mut self, when: &str, ssh_dead: bool) -> GuestState {
        let settle = when != "before reboot";
        let slug = self.unique(&when.replace(' ', "-"), "state-", ".json");
        let (m, dir) = (&self.machine, &self.run_dir);
        let snap = self
            .stages
            .run(&format!("state {when}"), async {
                let snap = drift::collect(m, when, ssh_dead, settle).await;
                if let Err(e) = drift::write_snapshot(dir, &slug, &snap) {
                    tracing::warn!("{e}");
                }
                tracing::info!("state {when}: read through {}", snap.state.sources());
                Ok(snap)
            })
            .await
            .expect("collect never fails");
        snap.state
    }

    /// "What the reboot changed": the diff of the states before and after it (stage of that
    /// name), into `reboot-diff.txt`.
    pub async fn diff_reboot(&mut self) -> Option<StateDiff> {
        let (before, after) = (self.state_before.as_ref()?, self.state_after.as_ref()?);
        let dir = &self.run_dir;
        let name = format!("{}.txt", self.unique("reboot-diff", "", ".txt"));
        let d = self
            .stages
            .run("what the reboot changed", async {
                let d = drift::diff(before, after);
                if let Err(e) = drift::write_diff(dir, &name, &d) {
                    tracing::warn!("{e}");
                }
                Ok(d)
            })
            .await
            .expect("a diff never fails");
        let breaks = d.findings.iter().filter(|f| f.breaks).count();
        tracing::info!(
            "what the reboot changed: {} finding(s), {breaks} that break something; {}",
            d.findings.len(),
            dir.join(&name).display()
        );
        self.reboot_diff = Some(d.clone());
        Some(d)
    }

    /// `boma-qvm diff`: the guest's state now against the post-apply snapshot this VM's cycle
    /// took, as stages `state now` and `diff`; the diff goes into `diff-<stamp>.txt`.
    pub async fn diff(&mut self) -> Result<StateDiff> {
        let before = drift::read_snapshot(&self.run_dir, STATE_BEFORE).map_err(|e| {
            if matches!(e, Error::Io { .. }) {
                Error::not_found(
                    format!(
                        "the post-apply state of {} (state-{STATE_BEFORE}.json in {})",
                        self.machine.name(),
                        self.run_dir.display()
                    ),
                    "a cycle takes it right after the apply; run `boma-qvm cycle` with this \
                     version to get one",
                )
            } else {
                e
            }
        })?;
        let now = self.snapshot_state("now", false).await;
        let dir = &self.run_dir;
        let name = format!(
            "diff-{}.txt",
            utc_stamp(crate::machine::events::now() as u64)
        );
        self.stages
            .run("diff", async {
                let d = drift::diff(&before, &now);
                drift::write_diff(dir, &name, &d)?;
                Ok(d)
            })
            .await
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
    /// their own. No SSH after the reboot is `Error::Lockout`, called once the guest says its
    /// boot is done: the incident signature.
    pub async fn reboot(&mut self) -> Result<()> {
        let m = &self.machine;
        let r = self.stages.run("reboot", m.reboot()).await?;
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

    /// End a step run on the kept VM (`apply`, `verify`, `reset`): its secrets masked in the
    /// VM's files, and scrubbed from the error.
    pub fn scrub<T>(&self, r: Result<T>) -> Result<T> {
        let scrubber = self.cfg.scrubber();
        mask_vm_files(&self.machine, &scrubber);
        r.map_err(|e| scrubber.error(e))
    }

    /// `reset`: back to the post-apply state from the snapshot (RAM, devices and disk as they
    /// were right after the apply; the guest's clock stepped to the host's through the agent),
    /// with no re-apply and no boot: the stage `reset` is what replaces a re-apply. Then the
    /// cycle's real reboot, what it changed diffed against the cycle's post-apply state, and
    /// the verify after it, as in the cycle.
    pub async fn reset(&mut self) -> Result<()> {
        let m = &self.machine;
        self.stages
            .run(RESET_STAGE, async {
                m.snapshot_load(SNAPSHOT).await?;
                // Without an agent (an image without one) the clock stays behind until the
                // reboot, which reads the RTC (it follows the host's clock).
                if let Err(e) = m.sync_clock().await {
                    tracing::warn!(
                        "{}: the clock was not stepped after the restore: {e}",
                        m.name()
                    );
                }
                Ok(())
            })
            .await?;
        self.state_before = drift::read_snapshot(&self.run_dir, STATE_BEFORE).ok();
        self.reboot_and_diff().await?;
        self.verify("verify after reboot").await?;
        Ok(())
    }

    /// The reboot, then the state after it and what it changed: also after a lockout (the
    /// state is then read through the agent or the console).
    pub async fn reboot_and_diff(&mut self) -> Result<()> {
        let r = self.reboot().await;
        let locked = r
            .as_ref()
            .err()
            .is_some_and(|e| matches!(e.inner(), Error::Lockout { .. }));
        if locked {
            self.class = Some(FailureClass::Lockout);
        }
        if r.is_ok() || locked {
            self.state_after = Some(self.snapshot_state("after reboot", locked).await);
            self.diff_reboot().await;
        }
        r
    }
}

/// Mask the cycle's secrets in place in the files of the kept VM's run directory that QEMU and
/// the supervisor write as the VM runs (console.log, events.jsonl, supervisor.log, ...), and in
/// any other file there except disk images: the guest's disk holds what it was given.
pub fn mask_vm_files(m: &Machine, scrubber: &crate::secrets::Scrubber) {
    let hit = scrubber.mask_tree(m.run_dir(), &crate::secrets::is_disk_image);
    if !hit.is_empty() {
        tracing::info!(
            "scrubbed secrets from {} file(s) of {}",
            hit.len(),
            m.run_dir().display()
        );
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
            secret_vars: cfg.secrets()?,
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

/// Run the playbook; `ran` is set once it ran (its failure is then the change's, not a
/// safety stop's or the tool's).
async fn play(
    session: &Session,
    pb: Playbook,
    log: &Path,
    ran: &std::cell::Cell<bool>,
) -> Result<PlaybookOutcome> {
    let opts = RunOptions {
        log: log.to_path_buf(),
        timeout: pb.default_timeout(),
        echo: true,
    };
    let out = session.run_playbook(pb, &opts).await?;
    ran.set(true);
    tracing::info!("{}", out.summary());
    out.into_result()
}
