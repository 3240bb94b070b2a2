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

/// Unmount anything mounted at or below `root` (deepest first, lazily, never following a symlink
/// at a mount point). `root` must be free of symlinks and on a path no one else can change: it
/// is compared with the mount table as it is, never resolved here.
fn unmount_under(root: &Path) {
    use nix::mount::MntFlags;
    for p in mounts_under(root) {
        tracing::warn!("unmounting leftover mount {}", show(&p));
        if let Err(e) = nix::mount::umount2(&p, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            tracing::warn!("cannot unmount {}: {e}", show(&p));
        }
    }
}

/// Delete `path`, an entry below the cache directory `anchor` that may hold leftover mounts (a
/// killed debootstrap's /proc, /sys, /dev/pts). Never follows a symlink:
///
/// - its parent directory is opened and must be, as the kernel resolved it, exactly
///   `anchor`/`rel` (no symlink between `anchor` and it); it and every directory above it must
///   belong to root or this user and let no other user rename what is inside (`trust`);
/// - the entry is looked at and removed relative to that open directory: a symlink (or any
///   non-directory) is unlinked as itself, and nothing it points at is touched or unmounted;
/// - a directory must belong to root or this user; mounts are looked up under its resolved path
///   only, unmounted deepest first, and a tree that still has a mount in it is refused rather
///   than deleted through (that would reach the host's files).
pub fn remove_tree(anchor: &Path, path: &Path) -> Result<()> {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
    use nix::unistd::{UnlinkatFlags, unlinkat};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let refuse = |why: String| {
        Error::image(
            format!("not removing {}: {why}", show(path)),
            "nothing was removed or unmounted; look at it, remove it by hand if it is yours, \
             then run `boma-qvm prune` again",
        )
    };
    let (Ok(rel), Some(parent), Some(name)) =
        (path.strip_prefix(anchor), path.parent(), path.file_name())
    else {
        return Err(refuse(format!("it is not inside {}", show(anchor))));
    };
    let expected_parent = std::fs::canonicalize(anchor)
        .ctx(|| format!("resolving {}", show(anchor)))?
        .join(rel.parent().unwrap_or(Path::new("")));
    let pdir = match std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(parent)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx(|| format!("opening {}", show(parent))),
    };
    let real_parent = std::fs::read_link(format!("/proc/self/fd/{}", pdir.as_raw_fd()))
        .ctx(|| format!("resolving {}", show(parent)))?;
    if real_parent != expected_parent {
        return Err(refuse(format!(
            "its directory resolves to {}, not {} (a symlink on the way)",
            show(&real_parent),
            show(&expected_parent)
        )));
    }
    super::trust::check(&real_parent, "the directory of")?;
    let st: FileStat = match fstatat(&pdir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(refuse(format!("cannot stat it: {e}"))),
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
        return unlinkat(&pdir, name, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| refuse(format!("cannot unlink it: {e}")));
    }
    if !super::trust::trusted_owner(st.st_uid) {
        return Err(refuse(format!(
            "it belongs to uid {}, not to root or this user",
            st.st_uid
        )));
    }
    // Open it without following a symlink (an entry swapped in since the stat fails here).
    let dir = openat(
        &pdir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| refuse(format!("cannot open it without following a link: {e}")))?;
    let real = real_parent.join(name);
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
    drop(dir);
    // The parent is this user's or root's and no one else can rename in it: `real` stays what
    // was checked. remove_dir_all never follows a symlink inside the tree.
    std::fs::remove_dir_all(&real).ctx(|| format!("removing {}", show(path)))
}

/// Deletes the rootfs (below the cache directory `anchor`) on drop, also when the build fails
/// or is cancelled.
pub struct RootfsGuard {
    pub anchor: PathBuf,
    pub root: PathBuf,
}

impl Drop for RootfsGuard {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.anchor, &self.root) {
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

    /// A tmpfs mounted for a test, unmounted when dropped (also on a failed assertion).
    struct Mount(PathBuf);

    impl Mount {
        fn tmpfs(at: &Path) -> Mount {
            std::fs::create_dir_all(at).unwrap();
            nix::mount::mount(
                Some("tmpfs"),
                at,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("size=1m"),
            )
            .unwrap();
            std::fs::write(at.join("inside"), "x").unwrap();
            Mount(at.to_path_buf())
        }

        fn is_mounted(&self) -> bool {
            mounts_under(&self.0).contains(&self.0)
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            while self.is_mounted() {
                if nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH).is_err() {
                    break;
                }
            }
        }
    }

    /// A cache directory (`images`) under a fresh temporary directory.
    fn cache() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let images = t.path().join("images");
        std::fs::create_dir(&images).unwrap();
        (t, images)
    }

    #[test]
    fn a_symlink_is_removed_as_a_link_and_its_target_is_untouched() {
        let (t, images) = cache();
        let target = t.path().join("target");
        let mnt = Mount::tmpfs(&target.join("mnt"));
        std::fs::write(target.join("keep"), "x").unwrap();
        let link = images.join(".tmp-link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        remove_tree(&images, &link).unwrap();
        assert!(
            std::fs::symlink_metadata(&link).is_err(),
            "link still there"
        );
        assert!(mnt.is_mounted(), "unmounted through the link");
        assert!(
            target.join("keep").exists() && target.join("mnt/inside").exists(),
            "the target's contents were removed"
        );
        let dir = images.join(".tmp-dir");
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        remove_tree(&images, &dir).unwrap();
        assert!(!dir.exists());
        remove_tree(&images, &dir).unwrap(); // gone already: fine
    }

    /// The debootstrap build's cleanup (`RootfsGuard`) removes `<staging>/rootfs`. If the staging
    /// directory became a symlink (to a tree with a `rootfs/` holding mounts), the guard must
    /// unmount and remove nothing there.
    #[test]
    fn the_build_cleanup_never_unmounts_through_a_swapped_staging_directory() {
        let (t, images) = cache();
        let staging = images.join(".tmp-build-x");
        let elsewhere = t.path().join("elsewhere");
        let mnt = Mount::tmpfs(&elsewhere.join("rootfs/proc"));
        std::os::unix::fs::symlink(&elsewhere, &staging).unwrap();
        let e = remove_tree(&images, &staging.join("rootfs")).unwrap_err();
        assert!(e.to_string().contains("a symlink on the way"), "{e}");
        drop(RootfsGuard {
            anchor: images.clone(),
            root: staging.join("rootfs"),
        });
        assert!(mnt.is_mounted(), "the cleanup unmounted through a symlink");
        assert!(elsewhere.join("rootfs/proc/inside").exists());
    }

    /// What the cleanup is for: a killed debootstrap's mount inside the real staging tree is
    /// unmounted and the tree removed.
    #[test]
    fn a_leftover_mount_in_the_real_staging_tree_is_unmounted_and_removed() {
        let (_t, images) = cache();
        let root = images.join(".tmp-build-y/rootfs");
        let mnt = Mount::tmpfs(&root.join("proc"));
        drop(RootfsGuard {
            anchor: images.clone(),
            root: root.clone(),
        });
        assert!(!mnt.is_mounted(), "the leftover mount is still there");
        assert!(!root.exists(), "the rootfs was not removed");
    }

    #[test]
    fn entries_of_others_or_in_a_writable_directory_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (_t, images) = cache();
        let theirs = images.join(".tmp-theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(4242), None).unwrap();
        let e = remove_tree(&images, &theirs).unwrap_err().to_string();
        assert!(e.contains("uid 4242"), "{e}");
        assert!(theirs.exists());

        let mine = images.join(".tmp-mine");
        std::fs::create_dir(&mine).unwrap();
        std::fs::set_permissions(&images, std::fs::Permissions::from_mode(0o2775)).unwrap();
        let e = remove_tree(&images, &mine).unwrap_err().to_string();
        assert!(e.contains("writable by its group"), "{e}");
        assert!(mine.exists());
    }
}
