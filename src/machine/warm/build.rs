//! Building a template: a cold boot to ready, the state saved, the overlay kept read-only.

use super::template::{clean_stale, in_use, lock, remove_old};
use super::{DISK, KEY, MANIFEST, STATE, TEMPLATE_HOST, Template, TemplateManifest, Want};
use super::{dir_of, find};
use crate::error::IoContext;
use crate::guest::image::{self, Image};
use crate::machine::provision::{self, Plan, SeedPlan, UpRequest};
use crate::machine::spec;
use crate::machine::state;
use crate::machine::vm::Vm;
use crate::stage::Stages;
use crate::{Error, Result, error::show, paths::Dirs};
use std::path::Path;
use std::time::Instant;

/// Build the template for `want`: a cold boot of `boma-it-warm-template` to ready, its state
/// saved, its overlay kept read-only. Waits for another process building one (and uses theirs
/// when it matches).
pub(super) async fn build(
    dirs: &Dirs,
    req: &UpRequest,
    img: &Image,
    want: &Want,
) -> Result<Template> {
    let wdir = dir_of(dirs, img);
    let held = {
        let wdir = wdir.clone();
        tokio::task::spawn_blocking(move || lock(wdir, true))
            .await
            .expect("lock task")?
    };
    if let Ok(t) = find(dirs, img, want) {
        tracing::info!(
            "another boma-qvm built the warm template meanwhile: {}",
            show(&t.dir)
        );
        return Ok(t);
    }
    clean_stale(&wdir);
    let staging = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(&wdir)
        .ctx(|| format!("creating a staging directory in {}", show(&wdir)))?;
    let fingerprint = want.fingerprint();
    let instance_id = format!("boma-warm-{fingerprint}");
    let mut treq = req.clone();
    treq.host = TEMPLATE_HOST.into();
    treq.dns_names.clear();
    treq.wait_ssh = true;
    let name = spec::vm_name(TEMPLATE_HOST)?;
    let plan = Plan {
        name: name.clone(),
        host: TEMPLATE_HOST.into(),
        backing: Some(img.disk.clone()),
        seed: SeedPlan::Warm {
            instance_id: instance_id.clone(),
        },
    };
    let t0 = Instant::now();
    let mut tstages = Stages::new();
    let made = match provision::cold(dirs, &treq, Some(img), &plan, &mut tstages).await {
        Ok(m) => m,
        Err(e) => return Err(give_up(dirs, &name, e).await),
    };
    let boot_secs = t0.elapsed().as_secs_f64();
    let saved = match state::save(&made.vm, &staging.path().join(STATE)).await {
        Ok(s) => s,
        Err(e) => return Err(give_up(dirs, &name, e).await),
    };
    let key = made.vm.run.ssh_key();
    let pubkey = std::fs::read_to_string(key.with_extension("pub"))
        .ctx(|| format!("reading {}.pub", show(&key)))?;
    std::fs::copy(&key, staging.path().join(KEY)).ctx(|| "copying the template's key".into())?;
    let mac = made
        .vm_net
        .as_ref()
        .map(|v| v.mac.to_string())
        .unwrap_or_default();
    // The overlay as it was at the save becomes the template's disk. It was made in the run
    // directory (the only place QEMU's account may write) and is that account's: moved while
    // QEMU is paused after the migration (its block layer inactive: it writes nothing more),
    // then this user's, so the cache's trust rule holds.
    if let Err(e) = take_disk(&made.vm.run.overlay(), &staging.path().join(DISK)) {
        return Err(give_up(dirs, &name, e).await);
    }
    provision::teardown(made.vm).await?;

    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let disk = staging.path().join(DISK);
    let disk_bytes = std::fs::metadata(&disk)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    for f in [&disk, &staging.path().join(STATE)] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o444))
            .ctx(|| format!("chmod 444 {}", show(f)))?;
    }
    let manifest = TemplateManifest {
        want: want.clone(),
        fingerprint: fingerprint.clone(),
        instance_id,
        mac,
        ssh_pubkey: pubkey.trim().into(),
        created: image::tool::utc_now(),
        state_bytes: saved.bytes,
        disk_bytes,
        boot_secs,
        save_secs: saved.secs,
    };
    let text = serde_json::to_string_pretty(&manifest).expect("serialises") + "\n";
    std::fs::write(staging.path().join(MANIFEST), text).ctx(|| "writing warm.json".into())?;
    std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o755))
        .ctx(|| format!("chmod {}", show(staging.path())))?;
    let target = wdir.join(&fingerprint);
    if target.exists() {
        // An incomplete or mismatching leftover of this fingerprint.
        if let Some(user) = in_use(dirs, &target.join(DISK)) {
            return Err(Error::image(
                format!(
                    "{} is in use by {user} and cannot be replaced",
                    show(&target)
                ),
                format!("remove that VM (`boma-qvm down {user}`), then run again"),
            ));
        }
        std::fs::remove_dir_all(&target).ctx(|| format!("removing {}", show(&target)))?;
    }
    let kept = staging.keep();
    std::fs::rename(&kept, &target)
        .ctx(|| format!("renaming {} to {}", show(&kept), show(&target)))?;
    let t = Template::load(&target)
        .map_err(|why| Error::image(format!("the new warm template: {why}"), "run again"))?;
    remove_old(dirs, img, &t);
    drop(held);
    tracing::info!(
        "warm template built in {:.0}s (cold boot to ready {:.0}s, state saved in {:.1}s): {} MiB of state, {} MiB of disk, in {}",
        t0.elapsed().as_secs_f64(),
        boot_secs,
        saved.secs,
        t.manifest.state_bytes >> 20,
        t.manifest.disk_bytes >> 20,
        show(&t.dir)
    );
    Ok(t)
}

/// Move the template VM's overlay `from` (its run directory) to `to` (the staging directory),
/// copying when they are on different filesystems, and make it this user's.
fn take_disk(from: &Path, to: &Path) -> Result<()> {
    if std::fs::rename(from, to).is_err() {
        std::fs::copy(from, to).ctx(|| format!("copying {} to {}", show(from), show(to)))?;
        let _ = std::fs::remove_file(from);
    }
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    nix::unistd::chown(to, Some(uid), Some(gid)).map_err(|e| Error::Io {
        context: format!("chown {}", show(to)),
        source: e.into(),
    })
}

/// The template VM failed: keep its console beside the state dir's panics, remove it, and say
/// where the console went.
async fn give_up(dirs: &Dirs, name: &str, e: Error) -> Error {
    let Ok(vm) = Vm::open(dirs, name) else {
        return e;
    };
    let kept = dirs.state.join("panics").join(format!(
        "{name}-{}.console.log",
        crate::machine::events::now() as u64
    ));
    std::fs::create_dir_all(kept.parent().expect("has a parent")).ok();
    std::fs::copy(vm.run.console_log(), &kept).ok();
    let _ = provision::teardown(vm).await;
    e.with_fix(format!(
        "building the warm template failed; its console is kept at {}. `--cold` boots without one",
        show(&kept)
    ))
}
