//! The busybox test guest: a Debian kernel and a tiny initramfs whose init prints markers on the
//! serial console (`BOMA-TESTGUEST-READY`), handles the ACPI power button and shuts down cleanly.
//! It boots in seconds, so `doctor --boot-test` and the test suite use it to prove QEMU, the
//! accelerator and the power path without a golden image.
//!
//! Its sources (`tests/guest/build.sh` and `tests/guest/rootfs/*`) are compiled into the binary,
//! so an installed boma-qvm with no repository checkout can build it: [`ensure`] writes them to a
//! temporary directory and runs the script into the cache, once per machine and per version of
//! the sources (`<cache>/testguest-<hash>/`). The script needs `apt-get download` of the release's
//! kernel package (a reachable Debian mirror), `dpkg` and `busybox-static`, which the
//! integration_test role installs.

use crate::error::IoContext;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The build script, as `tests/guest/build.sh` in the repository.
pub const BUILD_SH: &str = include_str!("../../tests/guest/build.sh");

/// The files of `tests/guest/rootfs/`, by name, sorted by name (the order the hash uses).
pub const ROOTFS: &[(&str, &str)] = &[
    ("inittab", include_str!("../../tests/guest/rootfs/inittab")),
    (
        "power-button",
        include_str!("../../tests/guest/rootfs/power-button"),
    ),
    (
        "rc.shutdown",
        include_str!("../../tests/guest/rootfs/rc.shutdown"),
    ),
    ("rcS", include_str!("../../tests/guest/rootfs/rcS")),
    (
        "udhcpc.script",
        include_str!("../../tests/guest/rootfs/udhcpc.script"),
    ),
];

/// Printed on the console when the guest's init has finished booting.
pub const READY: &str = "BOMA-TESTGUEST-READY";
/// Printed by the guest's shutdown script (`rc.shutdown`), run on a clean poweroff or reboot.
pub const SHUTDOWN: &str = "BOMA-TESTGUEST-SHUTDOWN";

/// A built guest: its kernel and initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The first 12 hex digits of a SHA-256 over build.sh and the rootfs files (each: its name, then
/// its contents; rootfs sorted by name). Names the cache directory, so worktrees or binaries with
/// different guests never rebuild over each other.
pub fn sources_hash() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"build.sh");
    h.update(BUILD_SH.as_bytes());
    for (name, text) in ROOTFS {
        h.update(name.as_bytes());
        h.update(text.as_bytes());
    }
    hex::encode(h.finalize())[..12].to_string()
}

/// Where the guest for these sources lives under `cache`.
pub fn dir(cache: &Path) -> PathBuf {
    cache.join(format!("testguest-{}", sources_hash()))
}

/// The guest, built into `<cache>/testguest-<hash>/` on first use (a few tens of seconds: one
/// kernel package download); later calls only check the script's stamp. Concurrent callers wait
/// on a lock file beside the directory. Blocking.
pub fn ensure(cache: &Path) -> Result<Guest> {
    use std::os::unix::fs::OpenOptionsExt;
    let out = dir(cache);
    // Root runs build.sh into `out`: nothing on the way may be another user's to change.
    crate::guest::image::trust::create_dir(&out)?;
    crate::guest::image::trust::check(&out, "the test guest's cache directory")?;
    let lock_path = out.with_extension("lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
        .ctx(|| format!("creating {}", lock_path.display()))?;
    let _held =
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
            Error::Io {
                context: format!("locking {}", lock_path.display()),
                source: e.into(),
            }
        })?;
    let src = tempfile::Builder::new()
        .prefix("bq-guest-src-")
        .tempdir()
        .ctx(|| "creating a directory for the test guest's sources".into())?;
    write_sources(src.path())?;
    let out_put = std::process::Command::new("bash")
        .arg(src.path().join("build.sh"))
        .arg(&out)
        .output()
        .ctx(|| "running the test guest's build.sh (is bash installed?)".into())?;
    if !out_put.status.success() {
        return Err(Error::image(
            format!(
                "building the test guest into {} failed ({}): {}",
                out.display(),
                out_put.status,
                String::from_utf8_lossy(&out_put.stderr).trim()
            ),
            "the build downloads this release's Debian kernel package (`apt-get update` first; a \
             Debian mirror must be reachable) and needs dpkg and busybox-static (`make setup` \
             installs them)",
        ));
    }
    let said = String::from_utf8_lossy(&out_put.stdout);
    if !said.trim().is_empty() {
        tracing::info!("{}", said.trim());
    }
    Ok(Guest {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
    })
}

/// Lay the embedded sources out as in the repository: `build.sh` and `rootfs/*`.
pub fn write_sources(dir: &Path) -> Result<()> {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).ctx(|| format!("creating {}", rootfs.display()))?;
    std::fs::write(dir.join("build.sh"), BUILD_SH).ctx(|| "writing build.sh".into())?;
    for (name, text) in ROOTFS {
        std::fs::write(rootfs.join(name), text).ctx(|| format!("writing rootfs/{name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file added to tests/guest/rootfs must be embedded too, or the installed binary would
    /// build a different guest than the tests.
    #[test]
    fn every_rootfs_file_is_embedded_in_name_order() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/rootfs");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        on_disk.sort();
        let embedded: Vec<String> = ROOTFS.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(embedded, on_disk);
    }

    #[test]
    fn written_sources_match_the_repository() {
        let d = tempfile::tempdir().unwrap();
        write_sources(d.path()).unwrap();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
        for rel in std::iter::once("build.sh".to_string())
            .chain(ROOTFS.iter().map(|(n, _)| format!("rootfs/{n}")))
        {
            assert_eq!(
                std::fs::read(d.path().join(&rel)).unwrap(),
                std::fs::read(repo.join(&rel)).unwrap(),
                "{rel}"
            );
        }
    }
}
