//! A running VM's memory and device state, saved to a file and restored from it: the mechanism
//! of warm starts. QEMU 7.2 has neither `file:` migration nor `mapped-ram` (both newer), QEMU's
//! sandbox (`spawn=deny`) forbids `exec:` URIs, and the account QEMU runs as may not write the
//! cache, so the state goes over a unix socket and boma-qvm writes the file: QEMU connects to
//! `migrate.sock` in its run directory (`migrate unix:...`) and this process copies the stream
//! to the file. Restoring is the mirror image, done by the supervisor: QEMU started with
//! `-incoming defer` inherits one end of a socket pair (`migrate-incoming fd:N`), the supervisor
//! feeds the file into the other (see `Vm::start_restoring`). Both work alike on QEMU 7.2 and
//! newer ones. The disk is not in the file: whoever restores brings the overlay as it was at
//! the instant of the save.

use crate::error::IoContext;
use crate::machine::events::{self, Record, Source, names};
use crate::machine::qemu::account;
use crate::machine::qmp::{self, Qmp};
use crate::machine::vm::Vm;
use crate::{Error, Result};
use std::os::unix::fs::PermissionsExt;
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
    let sock = vm.run.migrate_sock();
    let _ = std::fs::remove_file(&sock);
    let listener =
        tokio::net::UnixListener::bind(&sock).ctx(|| format!("listening on {}", sock.display()))?;
    let _unlink = Unlink(sock.clone());
    // QEMU's account must be able to connect: the socket goes to its group (the run directory
    // already admits only it and root). When QEMU runs as this user, the default mode does.
    if let Some(acct) = account::for_this_process()? {
        nix::unistd::chown(&sock, None, Some(acct.gid)).map_err(|e| Error::Io {
            context: format!("chown {}", sock.display()),
            source: e.into(),
        })?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660))
            .ctx(|| format!("setting the mode of {}", sock.display()))?;
    }
    let mut out = tokio::fs::File::create(file)
        .await
        .ctx(|| format!("creating {}", file.display()))?;
    let shown = file.display().to_string();
    let writer = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await?;
        let n = tokio::io::copy(&mut conn, &mut out).await?;
        out.sync_all().await?;
        Ok::<u64, std::io::Error>(n)
    });
    ctl.run(qapi::qmp::stop {}).await?;
    let what = format!("saving {}'s state to {}", vm.name, file.display());
    let migrated = async {
        ctl.run(qapi::qmp::migrate {
            // Relative: QEMU runs in the run directory (and may not reach the path above it).
            uri: Some(format!("unix:{MIGRATE_SOCK}")),
            channels: None,
            detach: None,
            resume: None,
        })
        .await?;
        qmp::wait_migration(ctl.service(), &what, Duration::from_secs(600)).await
    }
    .await;
    if let Err(e) = migrated {
        writer.abort();
        return Err(vm.explain(e));
    }
    // QEMU closes its end once the migration is complete: the copy ends with it.
    match tokio::time::timeout(Duration::from_secs(60), writer).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => {
            return Err(Error::Io {
                context: format!("writing {shown}"),
                source: e,
            });
        }
        Ok(Err(e)) => {
            return Err(Error::Io {
                context: format!("writing {shown}"),
                source: std::io::Error::other(e),
            });
        }
        Err(_) => {
            return Err(Error::timeout(
                format!("the end of {}'s state stream into {shown}", vm.name),
                60,
                String::new(),
            ));
        }
    }
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

/// The socket's name in the run directory (QEMU's cwd).
pub(crate) const MIGRATE_SOCK: &str = "migrate.sock";

/// Removes the migration socket whatever happens.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
