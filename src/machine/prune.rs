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
    // Processes whose pid files were lost: anything whose argv points into our VM directory.
    let vms_dir = dirs.vms();
    let ours = |argv: &[String]| {
        let is_qemu = argv.first().is_some_and(|a| a.contains("qemu-system"));
        let is_supervisor = argv.iter().any(|a| a == "__supervise");
        (is_qemu || is_supervisor) && procs::mentions(argv, &vms_dir)
    };
    for pid in procs::find(ours) {
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
