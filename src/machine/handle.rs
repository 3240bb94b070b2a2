//! [`Machine`]: the one handle on a VM. Tests and the CLI use it; its methods read like the
//! scenario they drive (the NixOS test driver's vocabulary):
//!
//! ```no_run
//! # async fn scenario(dirs: &boma_qvm::paths::Dirs, req: &boma_qvm::machine::UpRequest) -> boma_qvm::Result<()> {
//! use boma_qvm::machine::Machine;
//! use std::time::Duration;
//! let t = Duration::from_secs(120);
//! let m = Machine::up(dirs, req).await?;
//! m.expect_console("login:", t).await?;
//! m.succeed("systemctl is-active docker").await?;
//! m.reboot().await?; // clean, and proven: RESET, and a new boot_id over SSH
//! m.wait_for_event("RESET", t).await?;
//! m.down().await?; // the VM, its overlay, and its network registration
//! # Ok(()) }
//! ```
//!
//! Waits never sleep blindly: `wait_for_event` and `expect_console` each keep a cursor, see
//! what came after the previous wait, and fail fast when the console shows a guest failure or
//! QEMU exits. Faults are more `impl Machine` blocks, in `fault/`.

use super::events::{self, Record, Source, Tail, names};
use super::power::{self, RebootMode, ShutdownOutcome};
use super::provision::{self, UpRequest};
use super::spec::VmSpec;
use super::state::SavedState;
use super::vm::{StartOptions, Vm};
use super::{State, qmp::Qmp};
use crate::guest::ssh;
use crate::paths::Dirs;
use crate::stage::Stages;
use crate::{Error, Result};
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A VM under test, with cursors into its event log and console so waits see what happened
/// after the previous wait, not before.
pub struct Machine {
    pub(crate) vm: Vm,
    pub(crate) dirs: Dirs,
    pub(crate) start: StartOptions,
    pub(crate) events: tokio::sync::Mutex<Tail>,
    pub(crate) console: std::sync::Mutex<u64>,
}

/// What proved a clean reboot, and how long each half took.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebooted {
    /// ACPI power button -> the guest's SHUTDOWN.
    pub shutdown_secs: f64,
    /// reset -> SSH back (or -> RESET for a guest without SSH).
    pub boot_secs: f64,
    /// `/proc/sys/kernel/random/boot_id` before and after (guests with SSH).
    pub boot_ids: Option<(String, String)>,
}

impl Machine {
    /// Create and boot a VM (image or kernel, network, lease, SSH and cloud-init when asked).
    /// The cursors start at the VM's first event and console byte.
    pub async fn up(dirs: &Dirs, req: &UpRequest) -> Result<Machine> {
        Machine::up_staged(dirs, req, &mut Stages::new()).await
    }

    /// `up`, recording each stage (image, network, boot, lease, SSH, cloud-init) in `stages`.
    pub async fn up_staged(dirs: &Dirs, req: &UpRequest, stages: &mut Stages) -> Result<Machine> {
        let vm = provision::up(dirs, req, stages).await?;
        let m = Machine::new(dirs, vm, 0).with_start_options(req.start.clone());
        *m.events.lock().await = m.vm.tail_from_start();
        Ok(m)
    }

    /// A VM from a spec of the caller's own (a test guest with a disk of its own, say), not yet
    /// started: `start` powers it on.
    pub fn create(dirs: &Dirs, spec: &VmSpec) -> Result<Machine> {
        let vm = Vm::create(dirs, spec)?;
        let mut m = Machine::new(dirs, vm, 0);
        m.events = tokio::sync::Mutex::new(m.vm.tail_from_start());
        Ok(m)
    }

    /// Take over an existing VM by name (`askari` or `boma-it-askari`); the cursors start now.
    pub fn attach(dirs: &Dirs, name: &str) -> Result<Machine> {
        Machine::resolve(dirs, Some(name))
    }

    /// The named VM, or the only one when no name is given; the cursors start now.
    pub fn resolve(dirs: &Dirs, name: Option<&str>) -> Result<Machine> {
        let vm = Vm::resolve(dirs, name)?;
        let len = super::watch::console_len(&vm);
        Ok(Machine::new(dirs, vm, len))
    }

    /// Names of all VMs in `dirs`.
    pub fn list(dirs: &Dirs) -> Vec<String> {
        super::vm::list(dirs)
    }

    fn new(dirs: &Dirs, vm: Vm, console_at: u64) -> Machine {
        let tail = vm.tail();
        Machine {
            dirs: dirs.clone(),
            start: StartOptions::default(),
            events: tokio::sync::Mutex::new(tail),
            console: std::sync::Mutex::new(console_at),
            vm,
        }
    }

    /// How `start` and `power_on` start QEMU (the supervisor binary, resource guard).
    pub fn with_start_options(mut self, opts: StartOptions) -> Self {
        self.start = opts;
        self
    }

    pub fn name(&self) -> &str {
        &self.vm.name
    }

    /// The inventory host the VM mirrors (its name without the prefix when it has none).
    pub fn host(&self) -> String {
        self.spec()
            .ok()
            .and_then(|s| s.host)
            .unwrap_or_else(|| self.vm.name.clone())
    }

    pub fn dirs(&self) -> &Dirs {
        &self.dirs
    }

    pub fn spec(&self) -> Result<VmSpec> {
        self.vm.spec()
    }

    pub fn state(&self) -> State {
        self.vm.state()
    }

    pub fn is_running(&self) -> bool {
        self.vm.is_running()
    }

    /// The VM's run directory (spec, overlay, seed, key, sockets, console log, events.jsonl).
    pub fn run_dir(&self) -> &Path {
        &self.vm.run.dir
    }

    pub fn console_log(&self) -> PathBuf {
        self.vm.run.console_log()
    }

    /// The live console's pty, while QEMU runs.
    pub fn console_pty(&self) -> Option<PathBuf> {
        std::fs::read_to_string(self.vm.run.console_pty())
            .ok()
            .map(|p| PathBuf::from(p.trim()))
    }

    /// Every record in events.jsonl so far.
    pub fn events(&self) -> Result<Vec<Record>> {
        self.vm.events()
    }

    /// Write an annotation (a fault, a snapshot, a test's own marker) beside QEMU's events.
    pub fn record(&self, kind: &str, data: Value) -> Result<()> {
        let mut data = data;
        if let Value::Object(m) = &mut data {
            m.insert("kind".into(), Value::String(kind.into()));
        } else {
            data = serde_json::json!({ "kind": kind });
        }
        events::append(
            &self.vm.run.events(),
            &Record::new(Source::Fault, names::FAULT, data),
        )
    }

    /// The last `n` lines of the captured console.
    pub fn console_tail(&self, n: usize) -> String {
        self.vm.console_tail(n)
    }

    /// How often `needle` appears on the console since the first boot.
    pub fn console_count(&self, needle: &str) -> usize {
        self.vm.console_count(needle)
    }

    /// A KVM-time duration scaled for this VM's accelerator.
    pub fn scaled(&self, kvm: Duration) -> Duration {
        self.vm
            .spec()
            .map(|s| s.accel.scale(kvm))
            .unwrap_or(kvm * 5)
    }

    /// Power the VM on (its network first, if it has a NIC); returns once QEMU runs. The event
    /// cursor moves to this boot.
    pub async fn start(&self) -> Result<()> {
        let fresh = self.vm.tail();
        provision::start(&self.dirs, &self.vm, &self.start).await?;
        *self.events.lock().await = fresh;
        Ok(())
    }

    /// Power the VM on from a saved state (`save_state`) instead of booting it: the guest runs
    /// on from the instant it was saved (its network first, if it has a NIC). The VM's spec must
    /// give the same machine the state was saved from (sizes, devices); QEMU refuses anything
    /// else and the error says why. The event cursor moves to this start.
    pub async fn start_restoring(&self, state: &Path) -> Result<()> {
        let fresh = self.vm.tail();
        provision::start_restoring(&self.dirs, &self.vm, &self.start, state).await?;
        *self.events.lock().await = fresh;
        Ok(())
    }

    /// Save the running VM's memory and device state to `file` (QMP `migrate` over a unix
    /// socket that this process copies to the file: QEMU 7.2 has no `file:` migration, and
    /// QEMU's sandbox forbids `exec:`). The guest is paused first, so the state is one
    /// consistent instant and the disk is flushed with it; it stays paused afterwards (QEMU's
    /// `postmigrate`): destroy the VM, or `cont` it over QMP to go on. The disk is not in the
    /// file: restore it with the overlay as it was at this instant.
    pub async fn save_state(&self, file: &Path) -> Result<SavedState> {
        super::state::save(&self.vm, file).await
    }

    /// The VM's address on the isolated network.
    pub fn ip(&self) -> Result<Ipv4Addr> {
        provision::vm_ip(&self.dirs, &self.vm)
    }

    /// How the VM reaches its network (netd or directly), the way it was made; `None` without
    /// a NIC.
    pub fn net_access(&self) -> Result<Option<crate::net::access::NetAccess>> {
        provision::access_of(&self.dirs, &self.vm)
    }

    /// SSH to the VM as `ansible` with the run's key.
    pub fn conn(&self) -> Result<ssh::Conn> {
        provision::ssh_conn(&self.dirs, &self.vm)
    }

    /// Wait until SSH logins with the run's key work (image VMs).
    pub async fn wait_ssh(&self, timeout: Duration) -> Result<()> {
        let conn = self.conn()?;
        let ip = self.ip()?;
        provision::watched(&self.vm, async {
            crate::net::wait_for_ssh(ip, timeout).await?;
            ssh::wait_for_login(&conn, timeout).await
        })
        .await
    }

    /// Run `cmd` in the guest over SSH; its stdout, or `Error::Command` when it fails.
    pub async fn succeed(&self, cmd: &str) -> Result<String> {
        self.succeed_within(cmd, self.scaled(Duration::from_secs(60)))
            .await
    }

    /// `succeed` with an explicit timeout.
    pub async fn succeed_within(&self, cmd: &str, timeout: Duration) -> Result<String> {
        ssh::run_ok(&self.conn()?, cmd, timeout).await
    }

    /// Run `cmd` over SSH; its exit status (-1 when killed) and stdout, whatever the status.
    pub async fn execute(&self, cmd: &str, timeout: Duration) -> Result<(i32, String)> {
        let out = ssh::run(&self.conn()?, cmd, timeout).await?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// Retry `cmd` over SSH until it succeeds; its stdout. Fails fast on a console failure.
    pub async fn wait_until_succeeds(&self, cmd: &str, timeout: Duration) -> Result<String> {
        let conn = self.conn()?;
        let deadline = Instant::now() + timeout;
        provision::watched(&self.vm, async {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let last = match ssh::run_ok(&conn, cmd, left.min(Duration::from_secs(30))).await {
                    Ok(out) => return Ok(out),
                    Err(e) => e,
                };
                if Instant::now() >= deadline {
                    return Err(Error::timeout(
                        format!("`{cmd}` to succeed on {}", self.vm.name),
                        timeout.as_secs(),
                        format!(" (last: {last})"),
                    ));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
        .await
    }

    /// Run `argv` in the guest through the QEMU guest agent (as root; no network, no SSH):
    /// the break-glass way in when SSH is gone.
    pub async fn agent_exec(
        &self,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<super::qga::ExecOutput> {
        super::qga::exec(&self.vm.run.qga_sock(), argv, timeout).await
    }

    /// Step the guest's clock to the host's through the guest agent (after a restore, the
    /// guest's clock stopped at the instant of the save).
    pub async fn sync_clock(&self) -> Result<()> {
        super::qga::step_clock(
            &self.vm.run.qga_sock(),
            self.scaled(Duration::from_secs(30)),
        )
        .await
    }

    /// A clean reboot, proven rather than assumed: QEMU pauses instead of exiting on the guest's
    /// shutdown, the ACPI power button runs the guest's real shutdown path, then reset and a
    /// real boot. Returns once a RESET followed the SHUTDOWN and, for a guest with SSH, once SSH
    /// is back with a new boot_id (an unchanged one is `Error::Reboot`). Both halves are timed.
    ///
    /// SSH is waited for until the guest says its boot is done (console or agent) plus
    /// [`super::LOCKOUT_GRACE`], not for a blanket timeout: then it is `Error::Lockout`, with the
    /// evidence (how SSH fails, the boot-done signal, the agent, the console).
    pub async fn reboot(&self) -> Result<Rebooted> {
        self.reboot_within(None).await
    }

    /// `reboot`, giving the guest `shutdown` (default: 60 s scaled to the accelerator) to run
    /// its shutdown path.
    pub async fn reboot_within(&self, shutdown: Option<Duration>) -> Result<Rebooted> {
        let conn = self.conn().ok();
        let before = match &conn {
            Some(c) => Some(boot_id(c).await?),
            None => None,
        };
        let watch = self.vm.tail();
        let half = power::reboot(
            &self.vm,
            RebootMode::Clean,
            shutdown.unwrap_or_else(|| self.scaled(Duration::from_secs(60))),
        )
        .await?;
        let Some(conn) = conn else {
            return Ok(Rebooted {
                shutdown_secs: half.shutdown_secs,
                boot_secs: half.reset_secs,
                boot_ids: None,
            });
        };
        let boot = Instant::now();
        let wait = self.scaled(Duration::from_secs(90));
        provision::watched(&self.vm, self.ssh_back_or_lockout(&conn, watch, wait)).await?;
        let boot_secs = half.reset_secs + boot.elapsed().as_secs_f64();
        let before = before.expect("read with the connection");
        let after = boot_id(&conn).await?;
        if after == before {
            return Err(Error::Reboot {
                problem: format!(
                    "{}'s boot_id did not change ({before}): the guest did not reboot",
                    self.vm.name
                ),
                fix: format!(
                    "look for RESET in {} and at the console log",
                    self.vm.run.events().display()
                ),
            });
        }
        tracing::info!(
            "{}: rebooted for real (boot_id {before} -> {after}); shutdown {:.1}s, boot to SSH {boot_secs:.1}s",
            self.vm.name,
            half.shutdown_secs
        );
        Ok(Rebooted {
            shutdown_secs: half.shutdown_secs,
            boot_secs,
            boot_ids: Some((before, after)),
        })
    }

    /// Press the power button and wait for QEMU to exit; QEMU is stopped (`quit`, then
    /// SIGKILL) when the guest does not power off in time.
    pub async fn shutdown(&self) -> Result<ShutdownOutcome> {
        power::shutdown(&self.vm, self.scaled(Duration::from_secs(60))).await
    }

    /// `shutdown` with an explicit grace time for the guest.
    pub async fn shutdown_within(&self, timeout: Duration) -> Result<ShutdownOutcome> {
        power::shutdown(&self.vm, timeout).await
    }

    /// Save the running VM (RAM, devices, disk) as internal snapshot `tag` in its overlay.
    pub async fn snapshot_save(&self, tag: &str) -> Result<()> {
        self.hmp(&format!("savevm {tag}")).await?;
        self.record("snapshot-save", serde_json::json!({ "tag": tag }))
    }

    /// Go back to snapshot `tag`: the VM runs on exactly as it was when it was saved.
    pub async fn snapshot_load(&self, tag: &str) -> Result<()> {
        let list = self.hmp("info snapshots").await?;
        if !list.split_whitespace().any(|w| w == tag) {
            return Err(Error::not_found(
                format!("a `{tag}` snapshot in {}", self.vm.name),
                format!(
                    "take one first (`snapshot_save(\"{tag}\")`; `cycle --snapshot` takes `post-apply`)"
                ),
            ));
        }
        self.hmp(&format!("loadvm {tag}")).await?;
        self.record("snapshot-load", serde_json::json!({ "tag": tag }))
    }

    async fn hmp(&self, command: &str) -> Result<String> {
        let ctl: Qmp = self.vm.ctl().await?;
        let out = ctl
            .run(qapi::qmp::human_monitor_command {
                command_line: command.to_string(),
                cpu_index: None,
            })
            .await?;
        // HMP reports errors as text, not as a QMP error.
        if out.to_lowercase().contains("error") {
            return Err(Error::Qmp {
                problem: format!("`{command}` failed: {}", out.trim()),
                fix: format!(
                    "see {}'s qemu.log in {}",
                    self.vm.name,
                    self.vm.run.dir.display()
                ),
            });
        }
        Ok(out)
    }

    /// Destroy the VM: stop QEMU, remove its run directory and overlay, unregister it from the
    /// network, and take the network down when it was the last VM on it.
    pub async fn down(self) -> Result<()> {
        provision::teardown(self.vm).await
    }
}

async fn boot_id(conn: &ssh::Conn) -> Result<String> {
    let id = ssh::run_ok(
        conn,
        "cat /proc/sys/kernel/random/boot_id",
        Duration::from_secs(60),
    )
    .await?;
    Ok(id.trim().to_string())
}
