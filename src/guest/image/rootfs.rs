//! The offline build's root filesystem: turning a fresh debootstrap tree into a cloud-init guest,
//! reading what is in it, and removing it safely (debootstrap may leave /proc, /sys or /dev mounts
//! behind when it is killed; deleting through those would reach the host's).

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result, show};

/// Kernel/cloud-init settings dropped into the image (`/etc/cloud/cloud.cfg.d/90-boma-qvm.cfg`).
const CLOUD_CFG: &str = "\
# boma-qvm golden image: the seed is a NoCloud `cidata` volume (/dev/vdb); never probe the network
# for other datasources.
datasource_list: [ NoCloud, None ]
";

/// Mount points at or below `root` (a path with no symlinks in it), deepest first.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// /proc/self/mounts writes space, tab, newline and backslash in paths as `\NNN` (octal).
fn unescape_mount_path(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmount anything mounted at or below `root` (deepest first, lazily). `root` must already be
/// free of symlinks: it is compared with the mount table as it is, never resolved here.
fn unmount_under(root: &Path) {
    for p in mounts_under(root) {
        tracing::warn!("unmounting leftover mount {}", show(&p));
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("cannot unmount {}: {e}", show(&p));
        }
    }
}

/// Delete a directory tree that may hold leftover mounts (a killed debootstrap's /proc, /sys,
/// /dev/pts). Never follows a symlink: a symlink (or any non-directory) at `path` is removed as
/// itself, and nothing it points at is touched or unmounted. A tree that still has a mount in
/// it after unmounting is refused rather than deleted through (that would reach the host's
/// files).
pub fn remove_tree(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx(|| format!("lstat {}", show(path))),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path).ctx(|| format!("removing {}", show(path)));
    }
    // Resolve the parent only: `path` itself is a real directory, and stays as it is.
    let real = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .ctx(|| format!("resolving {}", show(parent)))?
            .join(name),
        _ => path.to_path_buf(),
    };
    unmount_under(&real);
    if let Some(m) = mounts_under(&real).first() {
        return Err(Error::image(
            format!(
                "not removing {}: {} is still mounted inside it",
                show(path),
                show(m)
            ),
            format!(
                "unmount it (`umount -l {}`), then run `boma-qvm prune` again",
                show(m)
            ),
        ));
    }
    std::fs::remove_dir_all(path).ctx(|| format!("removing {}", show(path)))
}

/// Deletes the rootfs on drop (also when the build fails or is cancelled).
pub struct RootfsGuard(pub PathBuf);

impl Drop for RootfsGuard {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.0) {
            tracing::warn!("{e}");
        }
    }
}

fn write(root: &Path, rel: &str, text: &str) -> Result<()> {
    let p = root.join(rel);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", show(dir)))?;
    }
    // Replace, never write through a symlink into the host.
    let _ = std::fs::remove_file(&p);
    std::fs::write(&p, text).ctx(|| format!("writing {}", show(&p)))
}

fn remove_glob_files(dir: &Path, keep: impl Fn(&str) -> bool) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_file() && !keep(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Turn a debootstrapped tree into a golden guest: root on the whole disk /dev/vda, a fresh
/// machine-id per instance, DHCP via netplan -> systemd-networkd, DNS via systemd-resolved,
/// cloud-init limited to NoCloud, nftables and networkd enabled, apt caches emptied.
/// (Host keys from openssh-server's postinst stay: cloud-init deletes and regenerates them per
/// instance, `ssh_deletekeys` defaults to true.)
pub fn configure(root: &Path) -> Result<()> {
    write(
        root,
        "etc/fstab",
        "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n",
    )?;
    // Empty (not missing): systemd generates a new one on first boot, and treats it as first boot.
    write(root, "etc/machine-id", "")?;
    let _ = std::fs::remove_file(root.join("var/lib/dbus/machine-id"));
    // debootstrap copied the build host's name and resolver; the guest gets its own.
    write(root, "etc/hostname", "debian\n")?;
    write(
        root,
        "etc/hosts",
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    )?;
    write(root, "etc/cloud/cloud.cfg.d/90-boma-qvm.cfg", CLOUD_CFG)?;
    let resolv = root.join("etc/resolv.conf");
    let _ = std::fs::remove_file(&resolv);
    let mut units = vec!["systemd-networkd", "nftables"];
    if root.join("usr/lib/systemd/systemd-resolved").exists() {
        std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", &resolv)
            .ctx(|| format!("linking {}", show(&resolv)))?;
        units.push("systemd-resolved");
    }
    crate::tools::run(
        std::process::Command::new("systemctl")
            .arg(format!("--root={}", root.display()))
            .arg("enable")
            .args(&units),
    )?;
    remove_glob_files(&root.join("var/cache/apt/archives"), |_| false);
    remove_glob_files(&root.join("var/cache/apt"), |n| !n.ends_with(".bin"));
    remove_glob_files(&root.join("var/lib/apt/lists"), |n| n == "lock");
    Ok(())
}

/// Package -> version of everything installed in `root`.
pub fn packages(root: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    let admindir = root.join("var/lib/dpkg");
    let out = crate::tools::run(
        std::process::Command::new("dpkg-query")
            .arg(format!("--admindir={}", admindir.display()))
            .args(["-W", "-f", "${Package}\t${Version}\n"]),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, v)| (p.to_string(), v.to_string()))
        .collect())
}

/// The one installed kernel: (version, vmlinuz path, initrd path).
pub fn kernel(root: &Path) -> Result<(String, PathBuf, PathBuf)> {
    let boot = root.join("boot");
    let mut versions: Vec<String> = std::fs::read_dir(&boot)
        .ctx(|| format!("listing {}", show(&boot)))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .collect();
    versions.sort();
    let Some(v) = versions.pop() else {
        return Err(Error::image(
            format!("no kernel in {}", show(&boot)),
            "make sure the package list includes linux-image-cloud-amd64",
        ));
    };
    let (k, i) = (
        boot.join(format!("vmlinuz-{v}")),
        boot.join(format!("initrd.img-{v}")),
    );
    if !i.is_file() {
        return Err(Error::image(
            format!("{} is missing", show(&i)),
            "check the build log for initramfs-tools errors",
        ));
    }
    Ok((v, k, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape_mount_path("/x\\134y"), "/x\\y");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/odd\\9"), "/odd\\9");
    }

    #[test]
    fn a_symlink_is_removed_as_a_link_and_its_target_is_untouched() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), "x").unwrap();
        let link = t.path().join(".tmp-link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        remove_tree(&link).unwrap();
        assert!(
            std::fs::symlink_metadata(&link).is_err(),
            "link still there"
        );
        assert!(
            target.join("keep").exists(),
            "the target's contents were removed"
        );
        let dir = t.path().join(".tmp-dir");
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        remove_tree(&dir).unwrap();
        assert!(!dir.exists());
        remove_tree(&dir).unwrap(); // gone already: fine
    }
}
