//! The image cache: the lock, staging directories and their atomic install, list/get/rm, and
//! which VMs use an image.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::{DISK, Image, MANIFEST, trust};
use crate::error::{Error, IoContext, Result, show};
use crate::paths::Dirs;

/// Image names are directory names: `[a-z0-9][a-z0-9._-]*`, at most 64 characters.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::input(
            format!("`{name}` is not a valid image name"),
            "use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit",
        ))
    }
}

/// Held while an image operation runs; dropping it releases `images/.lock`.
#[derive(Debug)]
pub struct Lock {
    _flock: Flock<File>,
}

/// The lock file, never through a symlink.
fn open_lock_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                Error::image(
                    format!("cannot open {}: {e}", show(path)),
                    "only the cache's owner adds or removes images (the shared cache is root's): \
                     run the image command with sudo, or use a cache of your own \
                     (BOMA_QVM_CACHE_DIR or --cache-dir)",
                )
            } else {
                Error::Io {
                    context: format!("opening {}", show(path)),
                    source: e,
                }
            }
        })
}

/// The cache's images directory, made if missing (owner-writable only), and refused unless only
/// root or this user can write it and the directories above it (`trust`).
pub fn trusted_images_dir(dirs: &Dirs) -> Result<std::path::PathBuf> {
    let images = dirs.images();
    trust::create_dir(&images)?;
    trust::check(&images, "the image cache")?;
    Ok(images)
}

/// Take the image-cache lock, waiting (and saying so) if another boma-qvm holds it. Stale staging
/// directories left by a killed process are removed once the lock is held. Waits at most
/// `LOCK_WAIT` for another holder (an image build takes a few minutes).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(20 * 60);

pub async fn lock(dirs: &Dirs) -> Result<Lock> {
    let images = trusted_images_dir(dirs)?;
    let path = images.join(".lock");
    let file = open_lock_file(&path)?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut file = file;
    let mut said = false;
    let flock = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => break f,
            Err((f, Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                if !said {
                    tracing::info!(
                        "another boma-qvm image operation holds {}; waiting (up to {} min)",
                        show(&path),
                        LOCK_WAIT.as_secs() / 60
                    );
                    said = true;
                }
                file = f;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(Error::image(
                    format!(
                        "another image operation held {} for {} min",
                        show(&path),
                        LOCK_WAIT.as_secs() / 60
                    ),
                    "see whether a `boma-qvm image build` or `pull` is still running \
                     (`pgrep -a boma-qvm`); the lock frees itself when its holder exits",
                ));
            }
            Err((_, e)) => return Err(lock_err(&path, e)),
        }
    };
    clean_stale(&images);
    Ok(Lock { _flock: flock })
}

fn lock_err(path: &Path, e: Errno) -> Error {
    Error::image(
        format!("cannot lock {}: {e}", show(path)),
        "check the cache directory is writable",
    )
}

/// What `prune_staging` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StagingPrune {
    /// Removed these stale staging entries (paths).
    Removed(Vec<String>),
    /// Another image operation holds the lock; its staging directory is live, so nothing was
    /// touched.
    Busy,
    /// The cache is not this user's to change (e.g. root's shared cache): nothing was touched.
    NotWritable,
}

/// Remove stale `.tmp-*` staging entries from the cache (for `prune`, and after an interrupted
/// image command). Never waits: when another image operation holds the lock, does nothing. Never
/// creates the cache.
pub fn prune_staging(dirs: &Dirs) -> Result<StagingPrune> {
    let images = dirs.images();
    if !images.is_dir() {
        return Ok(StagingPrune::Removed(vec![]));
    }
    trust::check(&images, "the image cache")?;
    if nix::unistd::access(&images, nix::unistd::AccessFlags::W_OK).is_err() {
        return Ok(StagingPrune::NotWritable);
    }
    let path = images.join(".lock");
    let _flock = match Flock::lock(open_lock_file(&path)?, FlockArg::LockExclusiveNonblock) {
        Ok(f) => f,
        Err((_, Errno::EWOULDBLOCK)) => return Ok(StagingPrune::Busy),
        Err((_, e)) => return Err(lock_err(&path, e)),
    };
    Ok(StagingPrune::Removed(clean_stale(&images)))
}

/// Remove `.tmp-*` staging entries; returns the ones removed. Only call with the lock held (every
/// operation that stages holds it throughout, so with the lock held, any staging entry is stale).
/// Never follows a symlink (`rootfs::remove_tree`), and leaves alone entries another user owns
/// (root leaves alone what is not root's).
fn clean_stale(images: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(images) else {
        return removed;
    };
    let me = nix::unistd::geteuid().as_raw();
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(".tmp-") {
            continue;
        }
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.uid() != me {
            tracing::warn!(
                "leaving stale staging entry {} alone: it belongs to uid {}, not to this user (uid {me})",
                show(&path),
                meta.uid()
            );
            continue;
        }
        tracing::info!("removing stale staging entry {}", show(&path));
        match super::rootfs::remove_tree(images, &path) {
            Ok(()) => removed.push(show(&path)),
            Err(err) => tracing::warn!("{err}"),
        }
    }
    removed
}

/// A staging directory inside the cache (same filesystem, so installing is a rename). Removed on
/// drop unless installed, through `rootfs::remove_tree` (never through a symlink, never across
/// a mount a killed build left).
#[derive(Debug)]
pub struct Staging {
    images: PathBuf,
    path: Option<PathBuf>,
}

impl Staging {
    pub fn path(&self) -> &Path {
        self.path
            .as_deref()
            .expect("a staging directory until installed")
    }

    /// The cache directory it is in.
    pub fn images(&self) -> &Path {
        &self.images
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(p) = self.path.take()
            && let Err(e) = super::rootfs::remove_tree(&self.images, &p)
        {
            tracing::warn!("{e}");
        }
    }
}

/// A fresh staging directory (mode 0700) inside the cache. Call with the lock held.
pub fn staging(dirs: &Dirs, what: &str) -> Result<Staging> {
    let images = trusted_images_dir(dirs)?;
    let path = tempfile::Builder::new()
        .prefix(&format!(".tmp-{what}-"))
        .tempdir_in(&images)
        .ctx(|| format!("creating a staging directory in {}", show(&images)))?
        .keep();
    Ok(Staging {
        images,
        path: Some(path),
    })
}

/// Atomically put the staged image in place as `images/<name>`. An existing image of that name is
/// swapped out in one `renameat2(RENAME_EXCHANGE)` and then deleted, so at every instant the name
/// holds either the old complete image or the new complete one.
pub fn install(dirs: &Dirs, mut staged: Staging, name: &str) -> Result<Image> {
    use std::os::unix::fs::PermissionsExt;
    validate_name(name)?;
    let target = dirs.images().join(name);
    let stage = staged.path().to_path_buf();
    Image::load(&stage)?; // complete before it can replace anything
    std::fs::set_permissions(&stage, std::fs::Permissions::from_mode(0o755))
        .ctx(|| format!("chmod {}", show(&stage)))?;
    if std::fs::symlink_metadata(&target).is_ok() {
        ensure_unused(dirs, name)?;
        let cwd = nix::fcntl::AT_FDCWD;
        nix::fcntl::renameat2(
            cwd,
            &stage,
            cwd,
            &target,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| Error::image(format!("cannot swap in {}: {e}", show(&target)), "retry"))?;
        // `staged` now holds the previous image; dropping it deletes that.
        drop(staged);
    } else {
        staged.path = None;
        std::fs::rename(&stage, &target)
            .ctx(|| format!("renaming {} to {}", show(&stage), show(&target)))?;
    }
    Image::load(&target)
}

/// VMs (run directories under `Dirs::vms()`) holding a qcow2 overlay backed by image `name`,
/// directly or through one of its warm templates (which live inside the image's directory).
pub fn users(dirs: &Dirs, name: &str) -> Vec<String> {
    let dir = dirs.images().join(name);
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let disk = dir.join(DISK);
    let warm = dir.join(crate::machine::warm::DIR);
    let backed = |b: &Path| b == disk || b.starts_with(&warm);
    let Ok(vms) = std::fs::read_dir(dirs.vms()) else {
        return vec![];
    };
    let mut out: Vec<String> = vms
        .flatten()
        .filter(|vm| {
            std::fs::read_dir(vm.path())
                .into_iter()
                .flatten()
                .flatten()
                .any(|f| {
                    f.path().extension().is_some_and(|e| e == "qcow2")
                        && super::overlay::info(&f.path())
                            .is_ok_and(|i| i.backing.as_deref().is_some_and(backed))
                })
        })
        .map(|vm| vm.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// Refuse to replace or delete an image that backs VM overlays: they would read another
/// image's blocks through their backing path (silent corruption).
pub fn ensure_unused(dirs: &Dirs, name: &str) -> Result<()> {
    let vms = users(dirs, name);
    if vms.is_empty() {
        return Ok(());
    }
    Err(Error::image(
        format!(
            "golden image `{name}` backs the overlays of VM(s) {}",
            vms.join(", ")
        ),
        "remove those VMs first (`boma-qvm down NAME`), or use another --name",
    ))
}

/// The cached image `name`, or `None` if there is no such directory.
/// Refused when others could have written it (`trust`; `Image::verify` checks its files).
pub fn find(dirs: &Dirs, name: &str) -> Result<Option<Image>> {
    validate_name(name)?;
    let images = dirs.images();
    let dir = images.join(name);
    if std::fs::symlink_metadata(&dir).is_err() {
        return Ok(None);
    }
    trust::check(&images, "the image cache")?;
    trust::check(&dir, &format!("golden image `{name}`"))?;
    if !dir.join(MANIFEST).exists() {
        return Ok(None);
    }
    Image::load(&dir).map(Some)
}

/// Whether this user can add images to the cache: its images directory (or the nearest one
/// above it that exists: it gets created) is usable and writable by them.
pub fn can_add(dirs: &Dirs) -> bool {
    crate::paths::unusable(&dirs.images(), true).is_none()
}

/// The cached image `name`, or `Error::NotFound` saying how to get one.
pub fn get(dirs: &Dirs, name: &str) -> Result<Image> {
    find(dirs, name)?.ok_or_else(|| {
        Error::not_found(
            format!("golden image `{name}` (in {})", show(&dirs.images())),
            "see `boma-qvm image list`; get one with `boma-qvm image pull`, `image build` or `image import PATH`",
        )
    })
}

/// Every cached image, sorted by name. Broken entries are logged and skipped.
pub fn list(dirs: &Dirs) -> Result<Vec<Image>> {
    let images = dirs.images();
    let Ok(entries) = std::fs::read_dir(&images) else {
        return Ok(vec![]);
    };
    trust::check(&images, "the image cache")?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        if let Err(err) = trust::check(&e.path(), &format!("golden image `{name}`")) {
            tracing::warn!("skipping {}: {err}", show(&e.path()));
            continue;
        }
        match Image::load(&e.path()) {
            Ok(img) => out.push(img),
            Err(err) => tracing::warn!("skipping {}: {err}", show(&e.path())),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Delete the cached image `name`. Overlays backed by it stop working, so remove VMs first.
pub async fn rm(dirs: &Dirs, name: &str) -> Result<()> {
    validate_name(name)?;
    let _lock = lock(dirs).await?;
    let images = dirs.images();
    let dir = images.join(name);
    if std::fs::symlink_metadata(&dir).is_err() {
        return Err(Error::not_found(
            format!("golden image `{name}`"),
            "see `boma-qvm image list`",
        ));
    }
    ensure_unused(dirs, name)?;
    super::rootfs::remove_tree(&images, &dir)?;
    tracing::info!(image = %name, "removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["debian-13-built", "a", "x1.2_y"] {
            validate_name(good).unwrap();
        }
        for bad in ["", ".lock", "../x", "A", "a/b", "-x", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    /// A VM whose overlay is backed by one of the image's warm templates uses the image too:
    /// `image rm` and a rebuild refuse while it exists.
    #[test]
    fn a_vm_on_a_warm_template_uses_the_image() {
        let t = tempfile::tempdir().unwrap();
        let dirs = Dirs::under(t.path());
        let img = dirs.images().join("img");
        let tmpl = img.join(crate::machine::warm::DIR).join("0123456789abcdef");
        std::fs::create_dir_all(&tmpl).unwrap();
        let golden = img.join(DISK);
        let o = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&golden)
            .arg("64M")
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        super::super::overlay::create(&golden, &tmpl.join("disk.qcow2"), None).unwrap();
        assert!(users(&dirs, "img").is_empty());
        let vm = dirs.vms().join("boma-it-w");
        std::fs::create_dir_all(&vm).unwrap();
        super::super::overlay::create(&tmpl.join("disk.qcow2"), &vm.join("disk.qcow2"), None)
            .unwrap();
        assert_eq!(users(&dirs, "img"), vec!["boma-it-w".to_string()]);
        assert!(ensure_unused(&dirs, "img").is_err());
    }
}
