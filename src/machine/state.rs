//! A running VM's memory and device state, saved to a file and restored from it: the mechanism
//! of warm starts. QEMU 7.2 has neither `file:` migration nor `mapped-ram` (both newer), so the
//! state goes through an `exec:` migration URI (`cat > FILE`; restoring is
//! `migrate-incoming exec:cat FILE` into a QEMU started with `-incoming defer`, done by the
//! supervisor: see `Vm::start_restoring`). The disk is not in the file: whoever restores brings
//! the overlay as it was at the instant of the save.

use crate::Result;
use crate::machine::events::{self, Record, Source, names};
use crate::machine::qmp::{self, Qmp};
use crate::machine::vm::Vm;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A VM's memory and device state, saved to a file.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedState {
    pub file: PathBuf,
    pub bytes: u64,
    pub secs: f64,
}

/// Pause the guest (one consistent instant; QEMU flushes the disk with it), lift QEMU's
/// live-migration bandwidth cap (128 MiB/s by default) and migrate to `file`. The VM is left
/// paused (`postmigrate`).
pub(crate) async fn save(vm: &Vm, file: &Path) -> Result<SavedState> {
    let ctl: Qmp = vm.ctl().await?;
    let t = Instant::now();
    let mut params: qapi::qmp::MigrateSetParameters =
        serde_json::from_value(serde_json::json!({})).expect("all fields are optional");
    params.max_bandwidth = Some(1 << 36);
    ctl.run(qapi::qmp::migrate_set_parameters(params)).await?;
    ctl.run(qapi::qmp::stop {}).await?;
    ctl.run(qapi::qmp::migrate {
        uri: Some(format!("exec:cat > {}", qmp::sh_quote(file))),
        channels: None,
        detach: None,
        resume: None,
    })
    .await?;
    let what = format!("saving {}'s state to {}", vm.name, file.display());
    qmp::wait_migration(ctl.service(), &what, Duration::from_secs(600))
        .await
        .map_err(|e| vm.explain(e))?;
    let saved = SavedState {
        file: file.to_path_buf(),
        bytes: std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
        secs: t.elapsed().as_secs_f64(),
    };
    tracing::info!(
        "{}: state saved to {} ({} MiB in {:.1}s)",
        vm.name,
        file.display(),
        saved.bytes >> 20,
        saved.secs
    );
    events::append(
        &vm.run.events(),
        &Record::new(
            Source::Boma,
            names::STATE_SAVED,
            serde_json::json!({"file": file, "bytes": saved.bytes, "secs": saved.secs}),
        ),
    )?;
    Ok(saved)
}
