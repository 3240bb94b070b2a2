//! Templates on disk: the manifest, where a user's templates live, finding the one that
//! matches, the lock, and removing the ones nothing uses any more.

use super::{DIR, DISK, KEY, MANIFEST, STATE, Want, differences};
use crate::error::IoContext;
use crate::guest::image::{self, Image};
use crate::machine::rundir::RunDir;
use crate::{Error, Result, error::show, paths::Dirs};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `warm.json`: the [`Want`] a template was made for, plus what it is and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateManifest {
    pub want: Want,
    pub fingerprint: String,
    /// The instance-id in the template's seed (and in every warm VM's seed).
    pub instance_id: String,
    /// The template VM's MAC: the restored guest's NIC has it until re-identification.
    pub mac: String,
    /// The template's own public key (authorised in the template only).
    pub ssh_pubkey: String,
    pub created: String,
    /// The memory and device state file.
    pub state_bytes: u64,
    /// Allocated bytes of the template's overlay (what the first boot wrote).
    pub disk_bytes: u64,
    /// Cold boot of the template VM to ready (lease, SSH, cloud-init done).
    pub boot_secs: f64,
    pub save_secs: f64,
}

/// A template on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub dir: PathBuf,
    pub manifest: TemplateManifest,
}

impl Template {
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK)
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE)
    }
    /// The template's private SSH key.
    pub fn key(&self) -> PathBuf {
        self.dir.join(KEY)
    }

    /// Refuse a template another user could have written (its state is the memory of the VM
    /// this run would start): the same rule as for the golden image it lives beside.
    pub fn check_trust(&self) -> Result<()> {
        let what = format!("the warm template {}", show(&self.dir));
        image::trust::check(&self.dir, &what)?;
        for f in [
            self.dir.join(MANIFEST),
            self.disk(),
            self.state(),
            self.key(),
        ] {
            image::trust::check(&f, &what)?;
        }
        Ok(())
    }

    /// The template in `dir`, complete (manifest, disk, state, key) or an error saying what is
    /// missing.
    pub fn load(dir: &Path) -> std::result::Result<Template, String> {
        let text = std::fs::read_to_string(dir.join(MANIFEST))
            .map_err(|e| format!("{} is unreadable ({e})", show(&dir.join(MANIFEST))))?;
        let manifest: TemplateManifest = serde_json::from_str(&text)
            .map_err(|e| format!("{} does not parse ({e})", show(&dir.join(MANIFEST))))?;
        let t = Template {
            dir: dir.to_path_buf(),
            manifest,
        };
        for f in [t.disk(), t.state(), t.key()] {
            if !f.is_file() {
                return Err(format!("{} is missing", show(&f)));
            }
        }
        Ok(t)
    }
}

/// Where this user's templates of `img` live: beside the image (`<image>/warm`) when this user
/// may write there (root; a user with a cache of their own); else in this user's state
/// directory (`<state>/warm/<image>`): an operator on the shared cache (root:kvm 2750) reads
/// the golden image but cannot add to it, so their first warm start builds a template of
/// their own there, backed by the shared golden image.
pub fn dir_of(dirs: &Dirs, img: &Image) -> PathBuf {
    let writable = |d: &Path| crate::paths::unusable(d, true).is_none();
    choose_dir(&img.dir, &dirs.state, &img.name, writable)
}

fn choose_dir(
    image_dir: &Path,
    state: &Path,
    image_name: &str,
    writable: impl Fn(&Path) -> bool,
) -> PathBuf {
    let beside = image_dir.join(DIR);
    let usable = if beside.is_dir() {
        writable(&beside)
    } else {
        writable(image_dir)
    };
    if usable {
        beside
    } else {
        state.join(DIR).join(image_name)
    }
}

/// Every complete template of `img` this user uses.
pub fn list(dirs: &Dirs, img: &Image) -> Vec<Template> {
    let mut out: Vec<Template> = std::fs::read_dir(dir_of(dirs, img))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Template::load(&e.path()).ok())
        .collect();
    out.sort_by(|a, b| a.manifest.created.cmp(&b.manifest.created));
    out
}

/// The template for `want`, or why there is none (one line, for the log).
pub fn find(dirs: &Dirs, img: &Image, want: &Want) -> std::result::Result<Template, String> {
    let dir = dir_of(dirs, img).join(want.fingerprint());
    let found = if dir.exists() {
        Some(Template::load(&dir))
    } else {
        None
    };
    match found {
        Some(Ok(t)) if t.manifest.want == *want => Ok(t),
        Some(Ok(t)) => Err(format!(
            "the warm template in {} does not match ({})",
            show(&dir),
            differences(&t.manifest.want, want).join("; ")
        )),
        Some(Err(why)) => Err(format!("the warm template is incomplete: {why}")),
        None => {
            let had = list(dirs, img)
                .into_iter()
                .rev()
                .find(|t| t.manifest.want.same_shape(want));
            match had {
                Some(t) => Err(format!(
                    "the warm template for {} ({}) does not match: {}",
                    img.name,
                    want.shape(),
                    differences(&t.manifest.want, want).join("; ")
                )),
                None => Err(format!(
                    "no warm template yet for {} ({})",
                    img.name,
                    want.shape()
                )),
            }
        }
    }
}

/// An flock on `<image>/warm/.lock`: shared while a VM's overlay is made on a template,
/// exclusive while a template is built or old ones are removed.
pub(super) fn lock(dir: PathBuf, exclusive: bool) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    image::trust::create_dir(&dir)?;
    image::trust::check(&dir, "the warm templates' directory")?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ctx(|| format!("opening {}", show(&path)))?;
    let arg = if exclusive {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockShared
    };
    Flock::lock(file, arg).map_err(|(_, e)| {
        Error::image(
            format!("cannot lock {}: {e}", show(&path)),
            "check the cache directory is writable",
        )
    })
}

/// Remove stale staging directories (only called with the exclusive lock held).
pub(super) fn clean_stale(wdir: &Path) {
    for e in std::fs::read_dir(wdir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            tracing::info!("removing stale staging directory {}", show(&e.path()));
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Which VM (in this state directory) or QEMU process uses `disk` as a backing file, if any.
pub fn in_use(dirs: &Dirs, disk: &Path) -> Option<String> {
    let disk = std::fs::canonicalize(disk).unwrap_or(disk.to_path_buf());
    for vm in std::fs::read_dir(dirs.vms())
        .into_iter()
        .flatten()
        .flatten()
    {
        let overlay = RunDir::new(vm.path()).overlay();
        if overlay.exists()
            && image::overlay::info(&overlay)
                .is_ok_and(|i| i.backing.as_deref() == Some(disk.as_path()))
        {
            return Some(vm.file_name().to_string_lossy().into_owned());
        }
    }
    // VMs of other state directories: a running QEMU holds its backing files open.
    let open =
        crate::machine::procs::find(|argv| argv.first().is_some_and(|a| a.contains("qemu-system")))
            .into_iter()
            .find(|pid| {
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == disk))
            });
    open.map(|pid| format!("QEMU pid {pid}"))
}

/// Remove the other templates of `keep`'s shape that nothing uses (the ones it replaces).
pub(super) fn remove_old(dirs: &Dirs, img: &Image, keep: &Template) {
    for t in list(dirs, img) {
        if t.dir == keep.dir || !t.manifest.want.same_shape(&keep.manifest.want) {
            continue;
        }
        match in_use(dirs, &t.disk()) {
            Some(user) => tracing::info!(
                "keeping the old warm template {} while {user} uses it",
                show(&t.dir)
            ),
            None => {
                tracing::info!("removing the old warm template {}", show(&t.dir));
                let _ = std::fs::remove_dir_all(&t.dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::warm::want::tests::want;

    fn image(dir: &Path) -> Image {
        Image {
            name: "debian-13-built".into(),
            dir: dir.to_path_buf(),
            disk: dir.join("disk.qcow2"),
            boot: crate::machine::spec::Boot::Disk,
            manifest: image::Manifest {
                name: "debian-13-built".into(),
                source: image::Source::Import { from: "x".into() },
                created: "2026-01-01T00:00:00Z".into(),
                disk_sha256: want().golden_sha256,
                disk_bytes: 1,
                boot: image::BootSpec::Disk,
                packages: Default::default(),
                stages: vec![],
                files: vec![],
            },
        }
    }

    /// Put a complete template made for `w` into `img`'s warm directory.
    fn install(dirs: &Dirs, img: &Image, w: &Want) -> PathBuf {
        let dir = dir_of(dirs, img).join(w.fingerprint());
        std::fs::create_dir_all(&dir).unwrap();
        for f in [DISK, STATE, KEY] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let m = TemplateManifest {
            want: w.clone(),
            fingerprint: w.fingerprint(),
            instance_id: format!("boma-warm-{}", w.fingerprint()),
            mac: "52:54:00:00:00:01".into(),
            ssh_pubkey: "ssh-ed25519 AAAA t".into(),
            created: image::tool::utc_now(),
            state_bytes: 1,
            disk_bytes: 1,
            boot_secs: 1.0,
            save_secs: 1.0,
        };
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
        dir
    }

    #[test]
    fn find_uses_the_matching_template_and_says_why_there_is_none() {
        let d = tempfile::tempdir().unwrap();
        let dirs = &Dirs::under(&d.path().join("home"));
        let img = image(d.path());
        let w = want();
        let none = find(dirs, &img, &w).unwrap_err();
        assert_eq!(
            none,
            "no warm template yet for debian-13-built (tcg, 2 vCPU, 3072 MiB, 20 GiB)"
        );

        let mut old = w.clone();
        old.qemu = "QEMU emulator version 7.2.21".into();
        install(dirs, &img, &old);
        let why = find(dirs, &img, &w).unwrap_err();
        assert!(
            why.starts_with("the warm template for debian-13-built (tcg, 2 vCPU, 3072 MiB, 20 GiB) does not match: QEMU")
                && why.contains("7.2.21") && why.contains("7.2.22"),
            "{why}"
        );
        let mut other = w.clone();
        other.memory_mib = 2048;
        install(dirs, &img, &other);
        assert!(find(dirs, &img, &w).is_err(), "another shape is no match");

        let dir = install(dirs, &img, &w);
        assert_eq!(find(dirs, &img, &w).unwrap().dir, dir);
        std::fs::remove_file(dir.join(STATE)).unwrap();
        let why = find(dirs, &img, &w).unwrap_err();
        assert!(
            why.contains("incomplete") && why.contains("state.bin"),
            "{why}"
        );
    }

    #[test]
    fn a_template_another_user_could_have_written_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dirs = &Dirs::under(&d.path().join("home"));
        let img = image(d.path());
        let t = Template::load(&install(dirs, &img, &want())).unwrap();
        t.check_trust().unwrap();
        std::fs::set_permissions(t.state(), std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = t.check_trust().unwrap_err().to_string();
        assert!(
            e.contains("state.bin") && e.contains("writable by every user"),
            "{e}"
        );
    }

    /// Beside the image when this user may write there; an operator on the shared cache (which
    /// only root writes) gets templates of their own in their state directory.
    #[test]
    fn templates_live_beside_the_image_unless_this_user_cannot_write_there() {
        let d = tempfile::tempdir().unwrap();
        let (img, state) = (
            d.path().join("images/debian-13-built"),
            d.path().join("state"),
        );
        let own = state.join("warm/debian-13-built");
        let choose = |w: &dyn Fn(&Path) -> bool| choose_dir(&img, &state, "debian-13-built", w);
        assert_eq!(choose(&|_| true), img.join("warm"));
        assert_eq!(choose(&|_| false), own);
        // No warm directory yet: whether the image's directory is writable decides.
        assert_eq!(choose(&|p| p == img), img.join("warm"));
        // Once there is one, it decides (root made it; the operator may not write in it).
        std::fs::create_dir_all(img.join("warm")).unwrap();
        assert_eq!(choose(&|p| p == img), own);
        assert_eq!(choose(&|p| p == img.join("warm")), img.join("warm"));
    }
}
