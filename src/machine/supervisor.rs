//! The per-VM supervisor: a small detached process (this same binary, `__supervise RUN_DIR`, in
//! its own session) that owns QEMU as its child for the VM's whole life. It opens the VM's tap,
//! starts QEMU paused, holds the QMP event stream and records every event into events.jsonl,
//! watches the console, holds the guest agent's channel open and relays it to clients
//! (`qga::relay`), and cleans up (sockets, pid files) when QEMU exits. CLI invocations and
//! tests come and go; they talk to QEMU over the second QMP monitor and read events.jsonl.

use crate::error::IoContext;
use crate::machine::events::{self, Record, Source, names};
use crate::machine::qemu::{account, argv};
use crate::machine::rundir::RunDir;
use crate::{Error, Result, machine::console, machine::procs, machine::qga, machine::qmp};
use futures::StreamExt;
use serde_json::json;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Grace period for QEMU to quit after a `quit`/SIGTERM before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(10);
/// How long a saved state may take to load (a few GiB from the page cache or disk).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);

/// Start the supervisor for `run`, detached (new session, double fork: it is nobody's child, so
/// it outlives this process and never becomes a zombie of a long-lived caller). `keep_fds` are
/// inherited by the supervisor (the slot lock). Returns once the supervisor is started; callers
/// wait for its `QEMU_STARTED` record.
pub fn spawn_detached(exe: &Path, run: &RunDir, keep_fds: &[i32]) -> Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.supervisor_log())
        .ctx(|| format!("opening {}", run.supervisor_log().display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__supervise").arg(&run.dir);
    for fd in keep_fds {
        cmd.arg("--keep-fd").arg(fd.to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().ctx(|| "dup log".into())?)
        .stderr(log);
    let fds = keep_fds.to_vec();
    // SAFETY: only async-signal-safe calls (setsid, fcntl, fork, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            for fd in &fds {
                let flags = libc::fcntl(*fd, libc::F_GETFD);
                libc::fcntl(*fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                0 => Ok(()),
                _ => libc::_exit(0),
            }
        });
    }
    let status = cmd.status().map_err(|e| {
        Error::qemu(
            format!("cannot start the supervisor {}: {e}", exe.display()),
            "check BOMA_QVM_EXE / the boma-qvm binary",
        )
    })?;
    if !status.success() {
        return Err(Error::qemu(
            format!("the supervisor failed to detach ({status})"),
            "see supervisor.log in the run directory",
        ));
    }
    Ok(())
}

fn record(run: &RunDir, rec: Record) {
    if let Err(e) = events::append(&run.events(), &rec) {
        tracing::warn!("cannot record {}: {e}", rec.event);
    }
}

fn remove_runtime_files(run: &RunDir) {
    for p in [
        run.qmp_sock(),
        run.ctl_sock(),
        run.qga_sock(),
        run.qga_qemu_sock(),
        run.console_pty(),
        run.qemu_pid(),
        run.supervisor_pid(),
    ] {
        let _ = std::fs::remove_file(p);
    }
}

/// The supervisor's main. Runs until QEMU exits (or SIGTERM asks it to stop QEMU).
pub async fn run(run: RunDir, tap: Option<OwnedFd>) -> Result<()> {
    let spec = run.read_spec()?;
    for p in [
        run.qmp_sock(),
        run.ctl_sock(),
        run.qga_sock(),
        run.qga_qemu_sock(),
    ] {
        let _ = std::fs::remove_file(p);
    }
    let tap_fd = tap.as_ref().map(|fd| fd.as_raw_fd());
    // A warm start: restore this saved state instead of booting. One-shot, so the request goes
    // now, whatever happens: a later start of the same VM boots.
    let restore = std::fs::read_to_string(run.restore_request())
        .ok()
        .map(|p| std::path::PathBuf::from(p.trim()));
    let _ = std::fs::remove_file(run.restore_request());
    let acct = account::for_this_process()?;
    // Files outside the run directory are opened here and handed over as fds: the account QEMU
    // runs as needs no way to them (root's cache is under /root).
    let outside = OutsideFiles::open(&spec)?;
    let handed = outside.handed();
    let mut args = argv::for_run_dir(&spec, &run, tap_fd, &handed);
    // The saved state reaches QEMU through a socket pair: its end is inherited, this end is fed
    // from the file once QEMU waits for it. QEMU's sandbox (spawn=deny) forbids `exec:` URIs,
    // its account may not read the cache, and `fd:` on a plain file is deprecated in newer QEMU.
    let incoming = match &restore {
        Some(state) => Some(Incoming::open(state)?),
        None => None,
    };
    if incoming.is_some() {
        args.extend(argv::incoming());
    }
    let mut inherited = handed.fds();
    inherited.extend(incoming.as_ref().map(Incoming::qemu_fd));
    if let Some(a) = &acct {
        account::check_readable(a, &outside.reopened)?;
        account::prepare_run_dir(
            &run,
            a,
            &[
                (run.overlay(), true),
                (run.seed(), false),
                (run.console_log(), true),
            ],
        )?;
    }
    let runs_as = match &acct {
        Some(a) => a.name.clone(),
        None => crate::net::dnsmasq::current_user(),
    };
    let drop_to = acct.as_ref().map(|a| {
        (
            a.uid.as_raw(),
            a.gid.as_raw(),
            a.groups.iter().map(|g| g.as_raw()).collect::<Vec<_>>(),
        )
    });
    let qemu_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.qemu_log())
        .ctx(|| "opening qemu.log".into())?;
    let mut cmd = tokio::process::Command::new(spec.qemu_binary());
    cmd.args(&args)
        .current_dir(&run.dir)
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone().ctx(|| "dup qemu.log".into())?)
        .stderr(qemu_log);
    let supervisor = std::process::id() as i32;
    // SAFETY: only async-signal-safe calls (setgroups, setresgid, setresuid, umask, prctl,
    // getppid, fcntl) between fork and exec; `drop_to` was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid, groups)) = &drop_to {
                // Root never runs QEMU: groups first, then the group, then the user.
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setresgid(*gid, *gid, *gid) != 0
                    || libc::setresuid(*uid, *uid, *uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // What QEMU creates (its sockets, the console log) is private to it (and root).
            libc::umask(0o077);
            // QEMU dies with its supervisor instead of running on unrecorded. Set after the
            // credential change, which clears it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if libc::getppid() != supervisor {
                return Err(std::io::Error::other("the supervisor is gone"));
            }
            for &fd in tap_fd.iter().chain(inherited.iter()) {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        Error::missing_tool(
            spec.qemu_binary().display().to_string(),
            format!("install QEMU (apt-get install qemu-system-x86), or the role roles/integration_test ({e})"),
        )
    })?;
    // The tap now lives in QEMU; our copy goes so the tap vanishes when QEMU exits.
    drop(tap);
    drop(outside);
    let incoming = incoming.map(Incoming::started);
    let pid = child.id().unwrap_or(0) as i32;
    std::fs::write(run.qemu_pid(), pid.to_string()).ctx(|| "writing qemu.pid".into())?;
    tracing::info!(
        "QEMU started as {runs_as}, pid {pid}, in {}: {} {}",
        run.dir.display(),
        spec.qemu_binary().display(),
        args.join(" ")
    );

    let qmp_path = run.qmp_sock();
    let opened = tokio::select! {
        r = qmp::open(&qmp_path, Duration::from_secs(30)) => r,
        status = child.wait() => Err(Error::qemu(
            format!("QEMU exited during start-up ({}): {}", status.map(|s| s.to_string()).unwrap_or_default(), console::tail(&run.qemu_log(), 5)),
            "read the QEMU error above; check the image and kernel paths",
        )),
    };
    let (service, mut qmp_events) = match opened {
        Ok(parts) => parts,
        Err(e) => {
            procs::terminate(pid, QUIT_GRACE).await;
            return Err(e);
        }
    };

    // Forward QMP events into events.jsonl (and drive command responses) in the background.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Record>();
    let events_task = tokio::spawn(async move {
        while let Some(ev) = qmp_events.next().await {
            match ev {
                Ok(ev) => {
                    let raw = serde_json::to_value(&ev).unwrap_or_default();
                    if tx.send(Record::from_qmp(&raw)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!("QMP event stream ended: {e}");
                    break;
                }
            }
        }
    });

    match service.execute(qapi::qmp::query_chardev {}).await {
        Ok(devs) => {
            if let Some(pty) = devs
                .iter()
                .find(|d| d.label == "ser0")
                .and_then(|d| d.filename.strip_prefix("pty:"))
            {
                let _ = std::fs::write(run.console_pty(), pty);
            }
        }
        Err(e) => tracing::warn!("query-chardev failed: {e}"),
    }
    if let (Some(state), Some((file, ours, qemu_fd))) = (&restore, incoming) {
        let t = std::time::Instant::now();
        let restored = async {
            service
                .execute(qapi::qmp::migrate_incoming {
                    uri: Some(format!("fd:{qemu_fd}")),
                    channels: None,
                    exit_on_error: None,
                })
                .await
                .map_err(|e| {
                    Error::qemu(
                        format!("migrate-incoming from {}: {e}", state.display()),
                        "see qemu.log in the run directory",
                    )
                })?;
            // Fed in a thread; its end closes when the file is through (EOF for QEMU). A copy
            // cut short (QEMU gave up) shows as the migration's own failure below.
            let feeder = tokio::task::spawn_blocking(move || {
                let (mut file, mut ours) = (file, ours);
                let r = std::io::copy(&mut file, &mut ours);
                let _ = ours.shutdown(std::net::Shutdown::Write);
                r
            });
            let info = qmp::wait_migration(
                &service,
                &format!("restoring the saved state {}", state.display()),
                RESTORE_TIMEOUT,
            )
            .await?;
            match feeder.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("feeding {} to QEMU: {e}", state.display()),
                Err(e) => tracing::warn!("feeding {} to QEMU: {e}", state.display()),
            }
            Ok(info)
        }
        .await;
        match restored {
            Ok(info) => record(
                &run,
                Record::new(
                    Source::Boma,
                    names::RESTORED,
                    json!({
                        "from": state,
                        "secs": t.elapsed().as_secs_f64(),
                        "bytes": info["ram"]["transferred"],
                    }),
                ),
            ),
            Err(e) => {
                procs::terminate(pid, QUIT_GRACE).await;
                let _ = child.wait().await;
                return Err(e);
            }
        }
    }
    record(
        &run,
        Record::new(
            Source::Boma,
            names::QEMU_STARTED,
            json!({"pid": pid, "accel": spec.accel.as_str(), "argv": args, "user": runs_as}),
        ),
    );
    // From here on the agent's channel has a host end for the VM's whole life.
    let (qga_qemu, qga_clients) = (run.qga_qemu_sock(), run.qga_sock());
    let relay = tokio::spawn(async move {
        if let Err(e) = qga::relay(&qga_qemu, &qga_clients).await {
            tracing::warn!("guest agent relay: {e}");
        }
    });
    let watcher = tokio::spawn(console::watch(
        run.console_log(),
        run.events(),
        spec.failure_patterns(),
    ));
    if let Err(e) = service.execute(qapi::qmp::cont {}).await {
        tracing::warn!("cont failed: {e}");
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .ctx(|| "SIGTERM handler".into())?;
    let mut stopping = false;
    let status = loop {
        tokio::select! {
            Some(rec) = rx.recv() => record(&run, rec),
            status = child.wait() => break status,
            _ = sigterm.recv(), if !stopping => {
                stopping = true;
                tracing::info!("SIGTERM: asking QEMU to quit");
                let _ = tokio::time::timeout(Duration::from_secs(5), service.execute(qapi::qmp::quit {})).await;
                let t = tokio::spawn(async move {
                    if procs::terminate(pid, QUIT_GRACE).await {
                        tracing::warn!("QEMU did not quit within {}s; killed it", QUIT_GRACE.as_secs());
                    }
                });
                drop(t);
            }
        }
    };
    // Record what QEMU said on its way out before the exit itself.
    let _ = tokio::time::timeout(Duration::from_secs(2), events_task).await;
    while let Ok(rec) = rx.try_recv() {
        record(&run, rec);
    }
    watcher.abort();
    relay.abort();
    let status_text = match &status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown: {e}"),
    };
    tracing::info!("QEMU exited: {status_text}");
    record(
        &run,
        Record::new(
            Source::Boma,
            names::QEMU_EXITED,
            json!({"pid": pid, "status": status_text}),
        ),
    );
    remove_runtime_files(&run);
    Ok(())
}

/// `boma-qvm __supervise RUN_DIR`: write the pid file first (so the starter can watch this
/// process), open the VM's tap if it has a NIC, then `run`. Errors go to supervisor.log and into
/// events.jsonl as a `QEMU_EXITED` record, which is what the starter waits on.
pub async fn main(run: RunDir) -> Result<()> {
    std::fs::write(run.supervisor_pid(), std::process::id().to_string())
        .ctx(|| "writing supervisor.pid".into())?;
    let r = async {
        let spec = run.read_spec()?;
        let tap = match &spec.nic {
            Some(nic) => Some(open_tap(&run, &spec.name, nic).await?),
            None => None,
        };
        self::run(run.clone(), tap).await
    }
    .await;
    if let Err(e) = &r {
        tracing::error!("supervisor: {e}");
        record(
            &run,
            Record::new(
                Source::Boma,
                names::QEMU_EXITED,
                json!({"status": "failed to start", "error": e.to_string()}),
            ),
        );
        remove_runtime_files(&run);
    }
    r
}

/// The files QEMU needs from outside its run directory, opened by the supervisor: a kernel and
/// initrd (QEMU reopens them through /proc/self/fd, so only their own mode counts) and the
/// overlay's golden image (read-only, in an fdset: QEMU opens nothing).
struct OutsideFiles {
    kernel: Option<std::fs::File>,
    initrd: Option<std::fs::File>,
    /// The overlay's backing chain, top down.
    backing: Vec<std::fs::File>,
    /// The files QEMU reopens by path, for the account's permission check.
    reopened: Vec<std::path::PathBuf>,
}

impl OutsideFiles {
    fn open(spec: &crate::machine::spec::VmSpec) -> Result<OutsideFiles> {
        let open = |p: &Path| std::fs::File::open(p).ctx(|| format!("opening {}", p.display()));
        let mut f = OutsideFiles {
            kernel: None,
            initrd: None,
            backing: Vec::new(),
            reopened: Vec::new(),
        };
        if let crate::machine::spec::Boot::Kernel { kernel, initrd, .. } = &spec.boot {
            f.kernel = Some(open(kernel)?);
            f.reopened.push(kernel.clone());
            if let Some(i) = initrd {
                f.initrd = Some(open(i)?);
                f.reopened.push(i.clone());
            }
        }
        // The whole chain: a warm VM's overlay is backed by its template's disk, itself backed
        // by the golden image.
        let mut below = spec.disk.clone();
        while let Some(disk) = below {
            below = crate::guest::image::overlay::info(&disk)?.backing;
            if let Some(b) = &below {
                if f.backing.len() >= MAX_CHAIN {
                    return Err(Error::input(
                        format!(
                            "{}'s backing chain is deeper than {MAX_CHAIN}",
                            show(&spec.disk)
                        ),
                        "rebuild the VM's overlay (`boma-qvm down`, then `up` again)",
                    ));
                }
                f.backing.push(open(b)?);
            }
        }
        Ok(f)
    }

    fn handed(&self) -> argv::Handed {
        let fd = |f: &Option<std::fs::File>| f.as_ref().map(|f| f.as_raw_fd());
        argv::Handed {
            kernel: fd(&self.kernel),
            initrd: fd(&self.initrd),
            backing: self.backing.iter().map(|f| f.as_raw_fd()).collect(),
        }
    }
}

/// The deepest backing chain handed over: overlay -> warm template's disk -> golden image is 2.
const MAX_CHAIN: usize = 4;

fn show(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// A saved state on its way into QEMU (a warm start): the file, opened here as the user who
/// started the VM, and a socket pair whose one end QEMU inherits (`migrate-incoming fd:N`).
struct Incoming {
    file: std::fs::File,
    ours: std::os::unix::net::UnixStream,
    theirs: std::os::unix::net::UnixStream,
}

impl Incoming {
    fn open(state: &Path) -> Result<Incoming> {
        let file = std::fs::File::open(state)
            .ctx(|| format!("opening the saved state {}", state.display()))?;
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().ctx(|| "a socket pair for the state".into())?;
        Ok(Incoming { file, ours, theirs })
    }

    fn qemu_fd(&self) -> i32 {
        self.theirs.as_raw_fd()
    }

    /// QEMU runs and holds its end: our copy of it goes (QEMU then sees EOF when we close ours).
    /// Returns the file, our end and the fd number QEMU knows its end by.
    fn started(self) -> (std::fs::File, std::os::unix::net::UnixStream, i32) {
        let n = self.theirs.as_raw_fd();
        drop(self.theirs);
        (self.file, self.ours, n)
    }
}

/// The VM's tap on its network's bridge: from netd when netd runs its network, else made here
/// (root) and recorded in the network's state (the state directory that holds the run
/// directory: `<state>/vms/<name>`).
async fn open_tap(
    run: &RunDir,
    name: &str,
    nic: &crate::machine::spec::NicSpec,
) -> Result<OwnedFd> {
    let state = run.dir.parent().and_then(Path::parent).ok_or_else(|| {
        Error::input(
            format!(
                "run directory {} has no state directory above it",
                run.dir.display()
            ),
            "run VMs from a boma-qvm state directory",
        )
    })?;
    let dirs = crate::paths::Dirs {
        state: state.to_path_buf(),
        ..crate::paths::Dirs::under(state)
    };
    let access = crate::net::access::NetAccess::recorded(&dirs, nic.netd.as_deref());
    let mut cfg = crate::net::Network::saved_config(&dirs);
    cfg.bridge = nic.bridge.clone();
    access.tap(&cfg, name).await
}
