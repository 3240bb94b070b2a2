//! Reap everything boma-qvm left behind after a crash: supervisors and QEMU processes of VMs in
//! this state directory, their sockets and run directories (overlays included).

use crate::machine::rundir::RunDir;
use crate::machine::vm::{self, Vm};
use crate::paths::Dirs;
use crate::{Result, machine::procs};
use std::time::Duration;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneReport {
    pub vms: Vec<String>,
    pub processes: Vec<i32>,
}

pub async fn prune(dirs: &Dirs) -> Result<PruneReport> {
    let mut report = PruneReport::default();
    for name in vm::list(dirs) {
        let vm = Vm {
            dirs: dirs.clone(),
            name: name.clone(),
            run: RunDir::new(dirs.vm(&name)),
        };
        vm.kill().await;
        std::fs::remove_dir_all(&vm.run.dir).ok();
        report.vms.push(name);
    }
    // Processes whose pid files were lost: supervisors whose argv points into our VM directory,
    // QEMUs running in it (QEMU's cwd is its run directory).
    let vms_dir = dirs.vms();
    let canonical = std::fs::canonicalize(&vms_dir).unwrap_or_else(|_| vms_dir.clone());
    let ours = |argv: &[String]| {
        argv.iter().any(|a| a == "__supervise") && procs::mentions(argv, &vms_dir)
    };
    let mut stray = procs::find(ours);
    stray.extend(qemus_in(&canonical));
    for pid in stray {
        procs::terminate(pid, Duration::from_secs(5)).await;
        report.processes.push(pid);
    }
    if vms_dir.exists() {
        for e in std::fs::read_dir(&vms_dir).into_iter().flatten().flatten() {
            std::fs::remove_dir_all(e.path()).ok();
        }
    }
    Ok(report)
}

/// QEMU processes whose working directory is under `dir` (QEMU runs in its run directory).
pub fn qemus_in(dir: &std::path::Path) -> Vec<i32> {
    procs::find(|argv| argv.first().is_some_and(|a| a.contains("qemu-system")))
        .into_iter()
        .filter(|pid| procs::cwd(*pid).is_some_and(|d| d.starts_with(dir)))
        .collect()
}
