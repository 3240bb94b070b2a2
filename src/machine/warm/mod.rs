//! Warm starts: a golden image booted once to ready (cloud-init done, sshd up), its memory and
//! device state saved, and every later VM of the same shape restored from it in seconds instead
//! of a cold boot of minutes (TCG), then re-identified as an instance of its own before anything
//! else touches it.
//!
//! A **template** lives beside its golden image, one directory per fingerprint:
//! `<images>/<golden>/warm/<fingerprint>/`:
//! - `disk.qcow2`: the template VM's overlay (backed by the golden disk) at the instant of the
//!   save, read-only; each warm VM's overlay is backed by it, so its disk matches the memory.
//! - `state.bin`: the memory and device state (`Machine::save_state`).
//! - `warm.json`: the manifest: what the template was made from (golden sha256, QEMU version,
//!   machine type, accelerator, vCPUs, memory, disk size, NIC model, the seed contract, QEMU's
//!   argv for its devices), and what it costs.
//! - `template-key`: the template's own SSH key (it opens no restored VM: re-identification
//!   replaces it with the run's key; tests use it to prove that).
//!
//! The fingerprint is a hash of everything a restore depends on ([`Want`]); anything that
//! changes it (a new golden image, a QEMU update, another size, a device added to the argv)
//! means another template: the first run of that shape says so in one line, boots cold to build
//! it, and restores from it. Older templates of the same shape that no VM uses are removed.
//!
//! **The seed contract** (what the template's cloud-init instance is): the NoCloud seed on
//! /dev/vdb, the template's instance-id (every warm VM's seed carries it, so the guest's next
//! boot, the cycle's real reboot, is not a cloud-init first boot), user `ansible` with
//! passwordless sudo, DHCP on the NIC matched by name `en*` with the MAC as client id. Each warm
//! VM's seed has its own host name and SSH key, which cloud-init reads at the next boot.
//!
//! **Re-identification**, through the guest agent (no network needed), before the lease and SSH:
//! the clock stepped to the host's; a fresh random seed (the kernel already reseeded from the
//! new VM generation ID); the host name; this run's SSH key the only authorised one; cloud-init's
//! cached datasource dropped (the next boot reads this run's seed); the NIC takes this VM's own
//! MAC and renews its lease, so it gets this VM's pinned address (two warm VMs never share one).
//! Shared with the template and not changed: the machine-id and the SSH host keys.

mod build;
mod restore;
mod template;
mod want;

pub(crate) use restore::restore;
pub use template::{Template, TemplateManifest, dir_of, find, in_use, list};
pub use want::{SeedContract, Want, differences};

use crate::guest::image::Image;
use crate::machine::provision::{self, UpRequest};
use crate::stage::Stages;
use crate::{Result, paths::Dirs};

/// Directory of an image's templates, inside the image's directory.
pub const DIR: &str = "warm";
pub const MANIFEST: &str = "warm.json";
pub const STATE: &str = "state.bin";
pub const DISK: &str = "disk.qcow2";
pub const KEY: &str = "template-key";
/// The host name of the VM a template is built in (`boma-it-warm-template`).
pub const TEMPLATE_HOST: &str = "warm-template";
/// The package that makes re-identification possible.
const AGENT_PACKAGE: &str = "qemu-guest-agent";

/// How `up` starts a VM for `req`.
pub(crate) enum Start {
    /// Restore from this template.
    Warm(Image, Box<Template>),
    /// Boot from scratch (the image, when there is one, is resolved already).
    Cold(Option<Image>),
}

/// Decide warm or cold for `req`, building the template first when there is none that matches
/// (its cold boot is this run's cold boot: saying so in one line). A kernel boot (no golden
/// image) is always cold, silently; an image VM is cold with `--cold`, without a network, or
/// when the image has no guest agent, and the log says why.
pub(crate) async fn plan(dirs: &Dirs, req: &UpRequest, stages: &mut Stages) -> Result<Start> {
    let crate::machine::OsSource::Image(choice) = &req.os else {
        return Ok(Start::Cold(None));
    };
    let img = provision::golden(dirs, req, choice, stages).await?;
    let cold = |why: String| {
        tracing::info!("cold boot: {why}");
        Ok(Start::Cold(Some(img.clone())))
    };
    if req.cold {
        return cold("--cold".into());
    }
    if req.net.is_none() {
        return cold(
            "no network (--no-net): a warm start renews the restored guest's lease".into(),
        );
    }
    if !img.manifest.packages.contains_key(AGENT_PACKAGE) {
        return cold(format!(
            "image `{}` has no {AGENT_PACKAGE} recorded in its manifest, and a restored guest is re-identified through it",
            img.name
        ));
    }
    let want = Want::new(&img, req)?;
    let template = match find(dirs, &img, &want) {
        Ok(t) => {
            t.check_trust()?;
            t
        }
        Err(why) => {
            tracing::warn!("{why}: cold boot to build it, then a warm start from it");
            let t = stages
                .run("warm template", build::build(dirs, req, &img, &want))
                .await?;
            return Ok(Start::Warm(img, Box::new(t)));
        }
    };
    Ok(Start::Warm(img, Box::new(template)))
}
