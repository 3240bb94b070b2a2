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

/// Unmount anything mounted at or below `path` (deepest first, lazily).
pub fn unmount_under(path: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let Ok(root) = std::fs::canonicalize(path) else {
        return;
    };
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        // /proc/self/mounts escapes spaces etc. as octal; our paths have none.
        .map(PathBuf::from)
        .filter(|p| p.starts_with(&root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        tracing::warn!("unmounting leftover mount {}", show(&p));
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("cannot unmount {}: {e}", show(&p));
        }
    }
}

/// Unmount-then-delete a directory tree that may hold leftover mounts.
pub fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    unmount_under(path);
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
    super::tool::run(
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
    let out = super::tool::run(
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
