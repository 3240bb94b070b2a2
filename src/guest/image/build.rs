//! `image build`: the offline golden image, for machines that reach only Debian's package mirror.
//!
//! debootstrap (minbase + the packages below, with a persistent package cache) -> configure the
//! tree (`rootfs::configure`) -> `mkfs.ext4 -d` into a sparse raw file (no loop mounts) ->
//! `qemu-img convert -O qcow2` -> copy the kernel and initrd out -> `manifest.json`. Everything
//! happens in a staging directory in the cache, renamed into place only on success, so a failed
//! build never replaces a good image. Each stage is timed and logged; debootstrap's own output goes
//! to `<cache>/logs/build-<name>.log`.

use std::path::Path;
use std::time::{Duration, Instant};

use super::rootfs::{self, RootfsGuard};
use super::{
    BootSpec, DEFAULT_APPEND, DISK, FileStamp, INITRD, Image, KERNEL, Manifest, Source, store, tool,
};
use crate::error::{Error, IoContext, Result, show};
use crate::paths::Dirs;

pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Overrides the default mirror (e.g. an air-gapped local mirror).
pub const MIRROR_ENV: &str = "BOMA_QVM_DEBIAN_MIRROR";
pub const SUITE: &str = "trixie";
pub const DEFAULT_DISK_SIZE: u64 = 8 << 30;
/// The root filesystem with the default packages is about 1.5 GiB; mkfs.ext4 -d needs room.
pub const MIN_DISK_GIB: u64 = 2;
/// A sanity bound (2 TiB): a thin qcow2 costs nothing until written, but a typo should not pass.
pub const MAX_DISK_GIB: u64 = 2048;

/// `--size-gib` in bytes, refused outside `MIN_DISK_GIB..=MAX_DISK_GIB`.
pub fn disk_size_from_gib(gib: u64) -> Result<u64> {
    let bytes = gib.checked_mul(1 << 30);
    match bytes {
        Some(b) if (MIN_DISK_GIB..=MAX_DISK_GIB).contains(&gib) => Ok(b),
        _ => Err(Error::input(
            format!(
                "--size-gib {gib} is out of range: the golden image needs at least \
                 {MIN_DISK_GIB} GiB for its root filesystem, and at most {MAX_DISK_GIB} GiB (2 TiB)"
            ),
            format!(
                "give --size-gib between {MIN_DISK_GIB} and {MAX_DISK_GIB} (default {}); a VM's \
                 own disk grows with `up --disk-gib`",
                DEFAULT_DISK_SIZE >> 30
            ),
        )),
    }
}

fn check_disk_size(bytes: u64) -> Result<()> {
    if bytes.is_multiple_of(1 << 30) {
        disk_size_from_gib(bytes >> 30).map(drop)
    } else {
        Err(Error::input(
            format!("disk size {bytes} bytes is not a whole number of GiB"),
            "give the size in GiB (--size-gib)",
        ))
    }
}

/// What goes into the image besides minbase. docker.io only Recommends docker-cli, so both are
/// named; busybox-static lets tests build container images offline.
pub const PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "openssh-server",
    "cloud-init",
    "netplan.io",
    "docker.io",
    "docker-cli",
    "containerd",
    "nftables",
    "iptables",
    "python3",
    "qemu-guest-agent",
    "sudo",
    "busybox-static",
    "xz-utils",
    "iproute2",
    "curl",
    "ca-certificates",
    "procps",
    "e2fsprogs",
    "kmod",
    "apparmor",
    "iputils-ping",
    "less",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    pub mirror: String,
    pub suite: String,
    /// Cache name to install as.
    pub name: String,
    /// Virtual disk size in bytes (the ext4 root filesystem fills it).
    pub disk_size: u64,
    pub extra_packages: Vec<String>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        let mirror = std::env::var(MIRROR_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_MIRROR.into());
        BuildOptions {
            mirror,
            suite: SUITE.into(),
            name: super::BUILT.into(),
            disk_size: DEFAULT_DISK_SIZE,
            extra_packages: vec![],
        }
    }
}

struct Stages(Vec<super::Stage>);

impl Stages {
    fn done(&mut self, name: &str, since: Instant) {
        let secs = since.elapsed().as_secs_f64();
        tracing::info!(
            stage = name,
            secs = format!("{secs:.1}"),
            "build stage done"
        );
        self.0.push(super::Stage {
            name: name.into(),
            secs: (secs * 10.0).round() / 10.0,
        });
    }
}

fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::image(
            "building the golden image needs root (debootstrap creates device nodes and chroots)",
            "run `boma-qvm image build` as root, or `boma-qvm image pull` the cloud image instead",
        ));
    }
    for (p, pkg) in [
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
        ("dpkg-query", "dpkg"),
        ("systemctl", "systemd"),
    ] {
        crate::tools::require(p, &format!("apt-get install {pkg}"))?;
    }
    Ok(())
}

/// Start `log` empty (mode 0644), never writing through a symlink.
fn new_log(log: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(log);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log)
        .map(drop)
        .ctx(|| format!("creating {}", show(log)))
}

/// Run `cmd` with its output appended to `log`, logging its last line every 30 s.
async fn run_logged(mut cmd: tokio::process::Command, what: &str, log: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log)
        .ctx(|| format!("opening {}", show(log)))?;
    let f2 = f.try_clone().ctx(|| format!("opening {}", show(log)))?;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(f)
        .stderr(f2)
        .kill_on_drop(true)
        .spawn()
        .ctx(|| format!("starting {what}"))?;
    let start = Instant::now();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(30),
        Duration::from_secs(30),
    );
    let status = loop {
        tokio::select! {
            s = child.wait() => break s.ctx(|| format!("waiting for {what}"))?,
            _ = tick.tick() => {
                let text = std::fs::read(log).unwrap_or_default();
                let last = crate::tools::tail(&text, 200);
                let last = last.lines().last().unwrap_or("");
                tracing::info!("{what}: still running after {:.0}s: {last}", start.elapsed().as_secs_f64());
            }
        }
    };
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read(log).unwrap_or_default();
    Err(Error::image(
        format!(
            "{what} failed ({status}); last output:\n{}",
            crate::tools::tail(&text, 1500)
        ),
        format!(
            "see the full log {}; check the mirror is reachable, then build again",
            show(log)
        ),
    ))
}

/// Build the golden image described by `opts` and install it (replacing an older build of the
/// same name only once the new one is complete).
pub async fn build(dirs: &Dirs, opts: &BuildOptions) -> Result<Image> {
    store::validate_name(&opts.name)?;
    check_disk_size(opts.disk_size)?;
    preflight()?;
    let _lock = store::lock(dirs).await?;
    store::ensure_unused(dirs, &opts.name)?;
    let total = Instant::now();
    let debcache = dirs.cache.join("debootstrap");
    let logs = dirs.cache.join("logs");
    for d in [&debcache, &logs] {
        super::trust::create_dir(d)?;
        super::trust::check(d, "the cache directory")?;
    }
    let log = logs.join(format!("build-{}.log", opts.name));
    new_log(&log)?;
    let staged = store::staging(dirs, "build")?;
    let root = staged.path().join("rootfs");
    let guard = RootfsGuard {
        anchor: staged.images().to_path_buf(),
        root: root.clone(),
    };
    let mut stages = Stages(vec![]);
    tracing::info!(suite = %opts.suite, mirror = %opts.mirror, log = %show(&log), "building golden image {}", opts.name);

    let t = Instant::now();
    let include: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .chain(opts.extra_packages.iter().map(String::as_str))
        .collect();
    let mut cmd = tokio::process::Command::new("debootstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--cache-dir={}", debcache.display()))
        .arg(format!("--include={}", include.join(",")))
        .args([&opts.suite, &show(&root), &opts.mirror]);
    run_logged(cmd, "debootstrap", &log).await?;
    stages.done("debootstrap", t);

    let t = Instant::now();
    rootfs::configure(&root)?;
    let packages = rootfs::packages(&root)?;
    let (kver, vmlinuz, initrd) = rootfs::kernel(&root)?;
    let mut files = Vec::new();
    for (src, name) in [(&vmlinuz, KERNEL), (&initrd, INITRD)] {
        let dst = staged.path().join(name);
        std::fs::copy(src, &dst).ctx(|| format!("copying {}", show(src)))?;
        tool::set_readonly(&dst)?;
        files.push(FileStamp::of(
            staged.path(),
            name,
            tool::sha256_file(&dst)?,
        )?);
    }
    stages.done("configure", t);

    let t = Instant::now();
    let raw = staged.path().join("disk.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(opts.disk_size))
        .ctx(|| format!("creating {}", show(&raw)))?;
    let mut mkfs = tokio::process::Command::new("mkfs.ext4");
    mkfs.args(["-q", "-L", "root", "-d"]).arg(&root).arg(&raw);
    run_logged(mkfs, "mkfs.ext4", &log).await?;
    stages.done("mkfs.ext4 -d", t);

    let t = Instant::now();
    let disk = staged.path().join(DISK);
    let mut convert = tokio::process::Command::new("qemu-img");
    convert
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk);
    run_logged(convert, "qemu-img convert", &log).await?;
    std::fs::remove_file(&raw).ctx(|| format!("removing {}", show(&raw)))?;
    stages.done("qemu-img convert", t);

    let t = Instant::now();
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .map_err(|e| Error::image(format!("cleanup task failed: {e}"), "retry"))?;
    stages.done("remove rootfs", t);

    let t = Instant::now();
    let disk_sha256 = tool::sha256_file_async(&disk).await?;
    tool::set_readonly(&disk)?;
    let disk_bytes = std::fs::metadata(&disk)
        .ctx(|| format!("stat {}", show(&disk)))?
        .len();
    files.insert(0, FileStamp::of(staged.path(), DISK, disk_sha256.clone())?);
    stages.done("sha256", t);

    Manifest {
        name: opts.name.clone(),
        source: Source::Build {
            suite: opts.suite.clone(),
            mirror: opts.mirror.clone(),
            kernel_version: kver,
        },
        created: tool::utc_now(),
        disk_sha256,
        disk_bytes,
        boot: BootSpec::Kernel {
            kernel: KERNEL.into(),
            initrd: INITRD.into(),
            append: DEFAULT_APPEND.into(),
        },
        packages,
        stages: stages.0,
        files,
    }
    .write(staged.path())?;
    let img = store::install(dirs, staged, &opts.name)?;
    tracing::info!(
        image = %opts.name,
        secs = format!("{:.1}", total.elapsed().as_secs_f64()),
        bytes = disk_bytes,
        "golden image built in {}",
        show(&img.dir)
    );
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_sizes_are_bounded_and_never_overflow() {
        assert_eq!(disk_size_from_gib(8).unwrap(), DEFAULT_DISK_SIZE);
        assert_eq!(disk_size_from_gib(2).unwrap(), 2 << 30);
        assert_eq!(disk_size_from_gib(2048).unwrap(), 2048 << 30);
        for bad in [0, 1, 2049, 1 << 34, u64::MAX] {
            let e = disk_size_from_gib(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().contains("between 2 and 2048"), "{e}");
        }
        check_disk_size(DEFAULT_DISK_SIZE).unwrap();
        assert!(check_disk_size(0).is_err());
        assert!(check_disk_size((8 << 30) + 1).is_err());
    }
}
