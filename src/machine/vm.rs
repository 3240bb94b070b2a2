//! A VM handle: create it, power it on (spawning its supervisor), ask its state, talk to it over
//! QMP, wait on its events, destroy it. The library API tests and the CLI both use.

use crate::error::IoContext;
use crate::machine::events::{self, Record, Source, Tail, names};
use crate::machine::guard;
use crate::machine::qmp::Qmp;
use crate::machine::rundir::RunDir;
use crate::machine::spec::{VM_PREFIX, VmSpec};
use crate::paths::Dirs;
use crate::{Error, Result, machine::console, machine::procs, machine::supervisor};
use serde_json::Value;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The supervisor and QEMU are alive.
    Running { supervisor: i32, qemu: i32 },
    /// The run directory exists, nothing runs (powered off, kept after a failure, or crashed).
    Off,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Running { .. } => "running",
            State::Off => "off",
        }
    }
}

/// How to power a VM on.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The binary that runs `__supervise` (this one, or `$BOMA_QVM_EXE`).
    pub exe: PathBuf,
    pub min_free_mib: Option<u64>,
    pub max_vms: usize,
    pub timeout: Duration,
}

impl Default for StartOptions {
    fn default() -> Self {
        let env_num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        StartOptions {
            exe: supervisor_exe(),
            min_free_mib: env_num("BOMA_QVM_MIN_FREE_MIB"),
            max_vms: env_num("BOMA_QVM_MAX_VMS").unwrap_or(1) as usize,
            timeout: Duration::from_secs(60),
        }
    }
}

/// `$BOMA_QVM_EXE`, else the running executable (the CLI itself).
pub fn supervisor_exe() -> PathBuf {
    std::env::var_os("BOMA_QVM_EXE")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("boma-qvm"))
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub dirs: Dirs,
    pub name: String,
    pub run: RunDir,
}

impl Vm {
    /// Make the run directory and write the spec. Refuses an existing VM of that name.
    pub fn create(dirs: &Dirs, spec: &VmSpec) -> Result<Vm> {
        let run = RunDir::new(dirs.vm(&spec.name));
        run.check_socket_paths()?;
        if run.dir.exists() {
            return Err(Error::AlreadyExists {
                what: format!("VM {}", spec.name),
                fix: format!(
                    "inspect it with `boma-qvm status {0}`, or remove it with `boma-qvm down {0}`",
                    spec.name
                ),
            });
        }
        super::rundir::create_private(&run.dir)?;
        run.write_spec(spec)?;
        Ok(Vm {
            dirs: dirs.clone(),
            name: spec.name.clone(),
            run,
        })
    }

    /// The VM whose run directory is `name`. A run directory without a readable spec still opens
    /// (so `down` can remove it); what needs the spec says what is wrong with it.
    pub fn open(dirs: &Dirs, name: &str) -> Result<Vm> {
        let run = RunDir::new(dirs.vm(name));
        if !run.dir.is_dir() {
            return Err(Error::not_found(
                format!("VM {name}"),
                "list VMs with `boma-qvm list`",
            ));
        }
        Ok(Vm {
            dirs: dirs.clone(),
            name: name.to_string(),
            run,
        })
    }

    /// The named VM, or the only one when no name is given.
    pub fn resolve(dirs: &Dirs, name: Option<&str>) -> Result<Vm> {
        if let Some(n) = name {
            return Vm::open(dirs, &crate::machine::spec::vm_name(n)?);
        }
        match list(dirs).as_slice() {
            [only] => Vm::open(dirs, only),
            [] => Err(Error::not_found(
                "any VM",
                "start one with `boma-qvm up HOST` (or `boma-qvm cycle HOST`)",
            )),
            many => Err(Error::input(
                format!("several VMs exist ({})", many.join(", ")),
                "name the VM you mean",
            )),
        }
    }

    pub fn spec(&self) -> Result<VmSpec> {
        self.run.read_spec()
    }

    /// Running only when the pid files name live processes that really are this VM's supervisor
    /// and its QEMU child: pid files outlive their processes, and pids get reused.
    pub fn state(&self) -> State {
        let sup = RunDir::read_pid(&self.run.supervisor_pid())
            .filter(|p| procs::alive(*p) && supervised_by_us(*p, &self.run));
        let qemu = sup.and_then(|s| {
            RunDir::read_pid(&self.run.qemu_pid()).filter(|q| qemu_of_us(*q, s, &self.run))
        });
        match (sup, qemu) {
            (Some(supervisor), Some(qemu)) => State::Running { supervisor, qemu },
            _ => State::Off,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state(), State::Running { .. })
    }

    fn require_running(&self) -> Result<()> {
        if self.is_running() {
            Ok(())
        } else {
            Err(Error::qemu(
                format!("VM {} is not running", self.name),
                format!(
                    "power it on with `boma-qvm start {0}`, or look at `boma-qvm console {0} --log`",
                    self.name
                ),
            ))
        }
    }

    /// Power on: resource guard, slot, detached supervisor; returns once QEMU runs.
    pub async fn start(&self, opts: &StartOptions) -> Result<()> {
        self.start_inner(opts, None).await
    }

    /// Power on from a saved state (`Machine::save_state`) instead of booting: QEMU starts
    /// waiting for it (`-incoming defer`), the supervisor loads it and lets the guest run on from
    /// where it was saved. The VM's spec must give the same machine (sizes, devices) the state
    /// was saved from. Returns once the guest runs (`RESTORED`, then `QEMU_STARTED`).
    pub async fn start_restoring(
        &self,
        opts: &StartOptions,
        state: &std::path::Path,
    ) -> Result<()> {
        let state = std::fs::canonicalize(state).map_err(|e| {
            Error::not_found(
                format!("saved state {} ({e})", state.display()),
                "save one first (`Machine::save_state`)",
            )
        })?;
        self.start_inner(opts, Some(&state)).await
    }

    async fn start_inner(
        &self,
        opts: &StartOptions,
        restore: Option<&std::path::Path>,
    ) -> Result<()> {
        if self.is_running() {
            return Err(Error::AlreadyExists {
                what: format!("a running VM {}", self.name),
                fix: "use it, or `boma-qvm down` it first".into(),
            });
        }
        // A supervisor whose QEMU just died may still be cleaning up (removing sockets and pid
        // files); starting now would let it delete the new QEMU's files.
        if let Some(pid) =
            RunDir::read_pid(&self.run.supervisor_pid()).filter(|p| supervised_by_us(*p, &self.run))
            && !procs::wait_gone(pid, Duration::from_secs(30)).await
        {
            return Err(Error::qemu(
                format!(
                    "the previous supervisor of {} (pid {pid}) is still running",
                    self.name
                ),
                format!("wait a moment, or `boma-qvm down {}`", self.name),
            ));
        }
        let spec = self.spec()?;
        crate::machine::qemu::find_binary(&spec.qemu_binary())?;
        guard::check_memory(
            guard::mem_available_mib()?,
            spec.memory_mib as u64,
            opts.min_free_mib,
        )?;
        let slot = guard::acquire_slot(&self.dirs, opts.max_vms, &self.name)?;
        let mut tail = self.tail();
        let _ = std::fs::remove_file(self.run.supervisor_pid());
        let mut wait = opts.timeout;
        match restore {
            Some(state) => {
                std::fs::write(self.run.restore_request(), state.display().to_string())
                    .ctx(|| format!("writing {}", self.run.restore_request().display()))?;
                // Loading the state comes before QEMU_STARTED.
                wait += Duration::from_secs(300);
            }
            None => {
                let _ = std::fs::remove_file(self.run.restore_request());
            }
        }
        supervisor::spawn_detached(&opts.exe, &self.run, &[slot.lock.as_raw_fd()])?;
        drop(slot);
        let started = tokio::select! {
            r = tail.wait_for("QEMU to start", wait, |r| {
                r.is(names::QEMU_STARTED) || r.is(names::QEMU_EXITED)
            }) => r,
            e = self.supervisor_gone() => Err(e),
        };
        let why = match started {
            Ok(r) if r.is(names::QEMU_STARTED) => {
                tracing::info!("{} running (QEMU pid {})", self.name, r.data["pid"]);
                return Ok(());
            }
            Ok(r) => r.data["error"]
                .as_str()
                .unwrap_or("QEMU exited")
                .to_string(),
            Err(e) => e.to_string(),
        };
        Err(Error::qemu(
            format!("{} did not start: {why}", self.name),
            format!(
                "see {} and {}",
                self.run.supervisor_log().display(),
                self.run.qemu_log().display()
            ),
        ))
    }

    /// The supervisor died or never came: its log's tail is the evidence, the fix says where.
    fn supervisor_failed(&self, what: &str) -> Error {
        let log = self.run.supervisor_log();
        Error::qemu(
            format!("{} for {}", what, self.name),
            format!(
                "read {} (and qemu.log beside it); `boma-qvm prune` clears what is left",
                log.display()
            ),
        )
        .with_evidence(
            format!("supervisor log tail ({})", log.display()),
            console::tail(&log, 5),
        )
    }

    /// Resolves if the supervisor never shows up or dies (crashed before recording anything).
    async fn supervisor_gone(&self) -> Error {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match RunDir::read_pid(&self.run.supervisor_pid()) {
                Some(pid) if procs::alive(pid) => {}
                Some(_) => {
                    // Give a final QEMU_EXITED record a moment to land before calling it a crash.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return self.supervisor_failed("the supervisor exited");
                }
                None if std::time::Instant::now() > deadline => {
                    return self.supervisor_failed("the supervisor never started");
                }
                None => {}
            }
        }
    }

    /// A command connection to QEMU (the second QMP monitor).
    pub async fn ctl(&self) -> Result<Qmp> {
        self.require_running()?;
        Qmp::connect(&self.run.ctl_sock(), Duration::from_secs(10)).await
    }

    /// Follow events from now on.
    pub fn tail(&self) -> Tail {
        Tail::from_end(&self.run.events())
    }

    /// Follow events from the VM's first one.
    pub fn tail_from_start(&self) -> Tail {
        Tail::from_start(&self.run.events())
    }

    pub fn events(&self) -> Result<Vec<Record>> {
        events::read_all(&self.run.events())
    }

    /// How often `needle` appears in the captured console so far.
    pub fn console_count(&self, needle: &str) -> usize {
        std::fs::read(self.run.console_log())
            .map(|b| String::from_utf8_lossy(&b).matches(needle).count())
            .unwrap_or(0)
    }

    /// Attach the console tail to `e` as evidence (the one place that does): a wait that timed
    /// out or a guest that failed is explained by what the guest printed last.
    pub fn explain(&self, e: Error) -> Error {
        e.with_evidence(
            format!("console tail ({})", self.run.console_log().display()),
            self.console_tail(25),
        )
    }

    pub fn console_tail(&self, lines: usize) -> String {
        console::tail(&self.run.console_log(), lines)
    }

    /// Record a fault (or any test annotation) beside QEMU's own events.
    pub fn record_fault(&self, kind: &str, data: Value) -> Result<()> {
        let mut data = data;
        if let Value::Object(m) = &mut data {
            m.insert("kind".into(), Value::String(kind.into()));
        } else {
            data = serde_json::json!({ "kind": kind });
        }
        events::append(
            &self.run.events(),
            &Record::new(Source::Fault, names::FAULT, data),
        )
    }

    /// Stop the supervisor and QEMU without a guest shutdown (SIGTERM -> QMP quit -> SIGKILL).
    pub async fn kill(&self) {
        if let Some(pid) =
            RunDir::read_pid(&self.run.supervisor_pid()).filter(|p| supervised_by_us(*p, &self.run))
        {
            procs::terminate(pid, Duration::from_secs(20)).await;
        }
        if let Some(pid) =
            RunDir::read_pid(&self.run.qemu_pid()).filter(|p| is_qemu_of(*p, &self.run))
        {
            procs::terminate(pid, Duration::from_secs(10)).await;
        }
    }

    /// Stop it if it runs and remove its run directory (overlay included).
    pub async fn destroy(self) -> Result<()> {
        self.kill().await;
        std::fs::remove_dir_all(&self.run.dir)
            .ctx(|| format!("removing {}", self.run.dir.display()))
    }
}

/// True when `pid` is the supervisor of `run` (pid files can outlive their process).
pub fn supervised_by_us(pid: i32, run: &RunDir) -> bool {
    let argv = procs::cmdline(pid);
    argv.iter().any(|a| a == "__supervise") && procs::mentions(&argv, &run.dir)
}

/// True when `pid` is a QEMU started for `run`: `-name NAME,...` (see `qemu::argv::base`) in
/// its argv, running in the run directory (QEMU's cwd: its files are named relative to it). A
/// `tail -f` of its console log is neither.
pub fn is_qemu_of(pid: i32, run: &RunDir) -> bool {
    let name = format!("{},", run.name());
    procs::cmdline(pid)
        .windows(2)
        .any(|w| w[0] == "-name" && w[1].starts_with(&name))
        && procs::cwd(pid)
            .is_some_and(|d| d == run.dir || std::fs::canonicalize(&run.dir).is_ok_and(|c| c == d))
}

/// True when `pid` is the QEMU of `run`: alive, a child of its supervisor, and its argv is
/// QEMU's for this VM.
pub fn qemu_of_us(pid: i32, supervisor: i32, run: &RunDir) -> bool {
    procs::alive(pid) && procs::ppid(pid) == Some(supervisor) && is_qemu_of(pid, run)
}

/// Names of all VMs with a run directory.
pub fn list(dirs: &Dirs) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dirs.vms())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(VM_PREFIX))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
