//! The pieces of a cycle that also run on their own against a kept VM (`boma-qvm apply`,
//! `assert`, `reboot`, `reset`): the apply, the verify, the proven reboot, the snapshot.

use crate::ansible::{Playbook, PlaybookOutcome, RunOptions, Session};
use crate::machine::power::{self, RebootMode};
use crate::machine::provision::watched;
use crate::machine::qmp::Qmp;
use crate::machine::vm::Vm;
use crate::{Error, Result, guest::ssh};
use std::path::Path;
use std::time::Duration;

/// The name of the post-apply snapshot inside the VM's overlay.
pub const SNAPSHOT: &str = "post-apply";

/// Run a playbook limited to the VM (the session checks the scope first), streaming to the
/// terminal and `log`. A failed playbook is an error (`Error::Ansible` / `Error::VerifyFailed`).
pub async fn playbook(session: &Session, pb: Playbook, log: &Path) -> Result<PlaybookOutcome> {
    let opts = RunOptions {
        log: log.to_path_buf(),
        timeout: pb.default_timeout(),
        echo: true,
    };
    let out = session.run_playbook(pb, &opts).await?;
    tracing::info!("{}", out.summary());
    out.into_result()
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

/// A clean reboot over QMP, proven rather than assumed: the RESET event arrived and the guest's
/// boot_id changed once SSH is back. No SSH after the reboot is reported as what it is: the
/// incident signature.
pub async fn reboot_proven(vm: &Vm, conn: &ssh::Conn) -> Result<()> {
    let accel = vm.spec()?.accel;
    let before = boot_id(conn).await?;
    power::reboot(vm, RebootMode::Clean, accel.scale(Duration::from_secs(60))).await?;
    let wait = accel.scale(Duration::from_secs(90));
    let back = watched(vm, ssh::wait_for_login(conn, wait)).await;
    if let Err(e) = back {
        return Err(Error::VerifyFailed(format!(
            "no SSH after the reboot ({e}).\n  This is the incident signature (a host that does not come back after a reboot): \
             read the console log in the run directory, or attach with `boma-qvm console {}`",
            vm.spec()?.host.unwrap_or_else(|| vm.name.clone())
        )));
    }
    let after = boot_id(conn).await?;
    if after == before {
        return Err(Error::qemu(
            format!("the guest's boot_id did not change ({before}): the reboot did not happen"),
            "look at events.jsonl for RESET and at the console log",
        ));
    }
    tracing::info!(
        "{}: rebooted for real (boot_id {before} -> {after})",
        vm.name
    );
    Ok(())
}

async fn hmp(vm: &Vm, command: &str) -> Result<String> {
    let ctl: Qmp = vm.ctl().await?;
    let out = ctl
        .run(qapi::qmp::human_monitor_command {
            command_line: command.to_string(),
            cpu_index: None,
        })
        .await?;
    // HMP reports errors as text, not as a QMP error.
    if out.to_lowercase().contains("error") {
        return Err(Error::Qmp(format!("`{command}` failed: {}", out.trim())));
    }
    Ok(out)
}

/// Save the running VM (RAM and disk) as an internal snapshot in its overlay.
pub async fn snapshot_save(vm: &Vm) -> Result<()> {
    hmp(vm, &format!("savevm {SNAPSHOT}")).await?;
    vm.record_fault("snapshot-save", serde_json::json!({ "tag": SNAPSHOT }))
}

/// Go back to the post-apply snapshot: the VM runs again exactly as it was right after the apply.
pub async fn snapshot_load(vm: &Vm) -> Result<()> {
    let list = hmp(vm, "info snapshots").await?;
    if !list.contains(SNAPSHOT) {
        return Err(Error::not_found(
            format!("a `{SNAPSHOT}` snapshot in {}", vm.name),
            "run the cycle with --snapshot (a post-apply snapshot is taken only then)",
        ));
    }
    hmp(vm, &format!("loadvm {SNAPSHOT}")).await?;
    vm.record_fault("snapshot-load", serde_json::json!({ "tag": SNAPSHOT }))
}
