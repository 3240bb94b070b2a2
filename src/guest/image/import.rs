//! `image import`: bring a qcow2 the user already has into the cache.

use std::path::{Path, PathBuf};

use super::store::{install, lock, staging, validate_name};
use super::{BootSpec, DISK, FileStamp, Image, Manifest, Source, tool};
use crate::error::{Error, IoContext, Result, show};
use crate::paths::Dirs;

/// The default import name: the file name without extensions, made valid.
fn import_name(path: &Path) -> String {
    let stem = path
        .file_name()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let stem = stem.split('.').next().unwrap_or_default();
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_start_matches(['-', '_']).to_string();
    if clean.is_empty() {
        "imported".into()
    } else {
        clean
    }
}

/// Refuse anything but an existing regular file (following symlinks), saying what it is instead.
fn check_regular_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(
                show(path),
                "give the path of an existing qcow2 file",
            ));
        }
        Err(e) => {
            return Err(Error::input(
                format!("cannot read {}: {e}", show(path)),
                "give the path of a qcow2 file you can read",
            ));
        }
    };
    let t = meta.file_type();
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(Error::input(
        format!("{} is {what}, not a disk image file", show(path)),
        if t.is_block_device() {
            "copy the device into a qcow2 first (`qemu-img convert -O qcow2 DEVICE OUT.qcow2`), then import OUT.qcow2"
        } else {
            "give the path of a qcow2 file (`boma-qvm image import PATH/TO/disk.qcow2`)"
        },
    ))
}

/// Copy a bootable qcow2 the user already has into the cache as `name` (default: its file stem),
/// read-only, with a manifest (boot mode disk). Refuses an existing name and non-qcow2 files.
pub async fn import(dirs: &Dirs, path: &Path, name: Option<&str>) -> Result<Image> {
    let name = name
        .map(str::to_string)
        .unwrap_or_else(|| import_name(path));
    validate_name(&name)?;
    check_regular_file(path)?;
    let info = super::overlay::info(path).map_err(|e| match e {
        // qemu-img could not open it: a damaged or truncated image, not a bug of ours.
        Error::Command { stderr, .. } => Error::image(
            format!("{} is not a readable disk image: {stderr}", show(path)),
            "the file is damaged or truncated (an interrupted copy or download?); get a good \
             copy, or repair it with `qemu-img check -r all FILE` and import again",
        ),
        other => other,
    })?;
    if info.format != "qcow2" || info.backing.is_some() {
        return Err(Error::input(
            format!(
                "{} is {} {}",
                show(path),
                info.format,
                if info.backing.is_some() {
                    "with a backing file"
                } else {
                    ""
                }
            ),
            "import a standalone qcow2 (`qemu-img convert -O qcow2 IN OUT` makes one)",
        ));
    }
    let _lock = lock(dirs).await?;
    if dirs.images().join(&name).exists() {
        return Err(Error::AlreadyExists {
            what: format!("golden image `{name}`"),
            fix: format!("pick another name with --name, or `boma-qvm image rm {name}` first"),
        });
    }
    let start = std::time::Instant::now();
    let staged = staging(dirs, "import")?;
    let disk: PathBuf = staged.path().join(DISK);
    let (src, dst) = (path.to_path_buf(), disk.clone());
    tokio::task::spawn_blocking(move || {
        std::fs::copy(&src, &dst).ctx(|| format!("copying {}", show(&src)))
    })
    .await
    .map_err(|e| Error::image(format!("copy task failed: {e}"), "retry"))??;
    let disk_sha256 = tool::sha256_file_async(&disk).await?;
    tool::set_readonly(&disk)?;
    let disk_bytes = std::fs::metadata(&disk)
        .ctx(|| format!("stat {}", show(&disk)))?
        .len();
    let from = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let stamp = FileStamp::of(staged.path(), DISK, disk_sha256.clone())?;
    Manifest {
        name: name.clone(),
        source: Source::Import { from: show(&from) },
        created: tool::utc_now(),
        disk_sha256,
        disk_bytes,
        boot: BootSpec::Disk,
        packages: Default::default(),
        stages: vec![],
        files: vec![stamp],
    }
    .write(staged.path())?;
    let img = install(dirs, staged, &name)?;
    tracing::info!(image = %name, secs = start.elapsed().as_secs_f64(), "imported {}", show(path));
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_names_come_from_the_file_stem() {
        assert_eq!(
            import_name(Path::new("/x/Debian-12.Gen.qcow2")),
            "debian-12"
        );
        assert_eq!(import_name(Path::new("/x/my img.qcow2")), "my-img");
        assert_eq!(import_name(Path::new("/x/.qcow2")), "imported");
    }
}
