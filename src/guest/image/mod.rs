//! Golden images: what one is (`Image`, its `manifest.json`), and `ensure`, the lazy resolver
//! `up`/`cycle` call to get one.
//!
//! Cache layout, under `Dirs::images()` (e.g. `~/.cache/boma-qvm/images/`), one directory per image:
//! - `debian-13-built/`        the offline debootstrap build (`image build`): `disk.qcow2`,
//!   `vmlinuz`, `initrd.img`, `manifest.json`; boots by direct kernel boot.
//! - `debian-13-genericcloud/` Debian's cloud image (`image pull`): `disk.qcow2`, `manifest.json`;
//!   boots from disk (SeaBIOS + GRUB).
//! - `<name>/`                 an imported qcow2 (`image import`); boots from disk.
//! - `.lock`                   serialises every image operation (pull, build, import, rm).
//! - `.tmp-*`                  staging directories; a finished operation renames its staging
//!   directory into place, so a half-done one never looks like an image. An image command
//!   interrupted by SIGINT/SIGTERM removes its own; stale ones (from a killed process) are
//!   removed by the next operation or by `boma-qvm prune`, under the lock, never following a
//!   symlink and leaving other users' entries alone.
//!
//! Golden files are mode 0444 and are only ever used as a qcow2 backing file (see `overlay`).
//!
//! Nothing in the cache may be writable by another user (`trust`): root acts on it and boots
//! what it holds. Each golden file's identity is recorded in the manifest when it enters the
//! cache (`FileStamp`: size, inode, mtime, ctime, sha256), and checked at every use (`ensure`,
//! the resolver `up` and `cycle` call): a few `stat`s when nothing changed; a full sha256
//! when anything did (a copied cache, or a swapped or rewritten file), and a file whose hash no
//! longer matches is refused. ctime cannot be set by a user, so a rewrite that restores size and
//! mtime is still seen.

pub mod build;
pub mod import;
pub mod overlay;
mod progress;
pub mod pull;
mod rootfs;
pub mod store;
pub mod tool;
pub(crate) mod trust;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result, show};
use crate::paths::Dirs;

/// The offline build's image name.
pub const BUILT: &str = "debian-13-built";
/// The pulled Debian cloud image's name.
pub const CLOUD: &str = "debian-13-genericcloud";
pub const DISK: &str = "disk.qcow2";
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd.img";
pub const MANIFEST: &str = "manifest.json";
/// Kernel command line for direct kernel boot: the overlay is the first virtio disk (`/dev/vda`,
/// a whole-disk ext4), the seed the second (`/dev/vdb`); the console on the first serial port.
pub const DEFAULT_APPEND: &str = "root=/dev/vda rw console=ttyS0";

/// How QEMU boots an image: the VM spec's boot mode.
pub use crate::machine::spec::Boot;

/// A cached golden image, ready to back an overlay.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub name: String,
    pub dir: PathBuf,
    /// The read-only golden qcow2.
    pub disk: PathBuf,
    pub boot: Boot,
    pub manifest: Manifest,
}

/// `manifest.json`, written beside every golden image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub source: Source,
    /// When the image entered the cache (RFC 3339, UTC).
    pub created: String,
    pub disk_sha256: String,
    pub disk_bytes: u64,
    pub boot: BootSpec,
    /// Package -> version (offline builds: from `dpkg-query -W`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub packages: BTreeMap<String, String>,
    /// Seconds per build stage (offline builds) or for the download (pulls).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<Stage>,
    /// What each golden file (disk, kernel, initrd) looked like when it entered the cache,
    /// checked at every use. Manifests from before these were recorded have none: their disk is
    /// then checked against `disk_sha256` in full, and the stamps recorded when this user may.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileStamp>,
}

/// One golden file's identity: `bytes`, `inode`, `mtime_ns`, `ctime_ns` are the cheap check,
/// `sha256` the full one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// The file's name in the image directory.
    pub file: String,
    pub bytes: u64,
    pub inode: u64,
    pub mtime_ns: u64,
    pub ctime_ns: u64,
    pub sha256: String,
}

impl FileStamp {
    /// The stamp of `dir/file` now, with its (already computed) sha256.
    pub fn of(dir: &Path, file: &str, sha256: String) -> Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let p = dir.join(file);
        let m = std::fs::symlink_metadata(&p).ctx(|| format!("stat {}", show(&p)))?;
        let ns = |s: i64, n: i64| (s.max(0) as u64) * 1_000_000_000 + n.max(0) as u64;
        Ok(FileStamp {
            file: file.to_string(),
            bytes: m.len(),
            inode: m.ino(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
            sha256,
        })
    }

    /// Whether `dir/file` is still the file stamped: same size, inode, mtime and ctime.
    fn unchanged(&self, dir: &Path) -> bool {
        FileStamp::of(dir, &self.file, String::new()).is_ok_and(|now| {
            (now.bytes, now.inode, now.mtime_ns, now.ctime_ns)
                == (self.bytes, self.inode, self.mtime_ns, self.ctime_ns)
        })
    }
}

/// One timed stage of making an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    pub secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// Downloaded from `url`, verified against the published `sha512`.
    Pull { url: String, sha512: String },
    /// Built offline with debootstrap.
    Build {
        suite: String,
        mirror: String,
        kernel_version: String,
    },
    /// Copied from a file the user had.
    Import { from: String },
}

/// Boot mode as stored in the manifest (file names relative to the image directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum BootSpec {
    Disk,
    Kernel {
        kernel: String,
        initrd: String,
        append: String,
    },
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&p).ctx(|| format!("reading {}", show(&p)))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::image(
                format!("{} does not parse: {e}", show(&p)),
                format!(
                    "remove the image with `boma-qvm image rm {}` and pull/build it again",
                    dir_name(dir)
                ),
            )
        })
    }

    /// Write `manifest.json` in `dir` (mode 0644), replacing any in one rename.
    pub fn write(&self, dir: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        let mut tmp = tempfile::Builder::new()
            .prefix(".manifest-")
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(dir)
            .ctx(|| format!("writing {}", show(&p)))?;
        tmp.write_all((text + "\n").as_bytes())
            .ctx(|| format!("writing {}", show(&p)))?;
        tmp.persist(&p)
            .map_err(|e| e.error)
            .ctx(|| format!("writing {}", show(&p)))?;
        Ok(())
    }
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Image {
    /// Load the image in `dir` and check its files are there.
    pub fn load(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let name = dir_name(dir);
        let disk = dir.join(DISK);
        let boot = match &manifest.boot {
            BootSpec::Disk => Boot::Disk,
            BootSpec::Kernel {
                kernel,
                initrd,
                append,
            } => Boot::Kernel {
                kernel: dir.join(kernel),
                initrd: Some(dir.join(initrd)),
                append: append.clone(),
            },
        };
        let mut files = vec![disk.clone()];
        if let Boot::Kernel { kernel, initrd, .. } = &boot {
            files.push(kernel.clone());
            files.extend(initrd.clone());
        }
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(Error::image(
                format!("image `{name}` is incomplete: {} is missing", show(missing)),
                format!("run `boma-qvm image rm {name}` and pull/build/import it again"),
            ));
        }
        Ok(Image {
            name,
            dir: dir.to_path_buf(),
            disk,
            boot,
            manifest,
        })
    }
}

/// Which golden image a VM should use. There is one default everywhere (CI, an offline
/// machine, a networked KVM host): the offline build, because it is the image that has what the
/// bundled example and real boma hosts need (Docker, docker-cli, qemu-guest-agent, nftables).
/// Debian's genericcloud image has neither Docker nor the guest agent, so it is never picked
/// unless asked for by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageChoice {
    /// The pulled Debian cloud image (pulled if missing).
    Cloud(pull::PullOptions),
    /// The offline debootstrap build (built if missing).
    Built(build::BuildOptions),
    /// An image already in the cache (e.g. imported); never fetched.
    Named(String),
}

impl Default for ImageChoice {
    fn default() -> Self {
        ImageChoice::Built(Default::default())
    }
}

impl std::str::FromStr for ImageChoice {
    type Err = Error;
    /// `built` (or `build`, `debian-13-built`), `cloud` (or `pull`, `debian-13-genericcloud`),
    /// or the name of a cached image.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => {
                return Err(Error::input(
                    "--image auto is gone: it picked Debian's cloud image when it could, which has no Docker and no guest agent",
                    "drop --image (the default, `built`, is the offline build with Docker and the agent), or name an image: built, cloud, or one from `boma-qvm image list`",
                ));
            }
            "cloud" | "pull" | CLOUD => ImageChoice::Cloud(Default::default()),
            "built" | "build" | BUILT => ImageChoice::Built(Default::default()),
            other => {
                store::validate_name(other)?;
                ImageChoice::Named(other.to_string())
            }
        })
    }
}

impl ImageChoice {
    /// The image's name in the cache.
    pub fn name(&self) -> &str {
        match self {
            ImageChoice::Cloud(o) => &o.name,
            ImageChoice::Built(o) => &o.name,
            ImageChoice::Named(n) => n,
        }
    }

    /// What can be known before anything is made: a named image must be in the cache (a built
    /// or cloud image is made on first use), and a cached one must be one only root or this
    /// user can have written (`trust`; its files are checked by `ensure`).
    /// A built or cloud image that is not cached yet must be one this user can add: an
    /// operator on the shared cache (root:kvm 2750) uses the images root put there.
    pub fn check(&self, dirs: &Dirs) -> Result<()> {
        let (name, how) = match self {
            ImageChoice::Named(name) => return store::get(dirs, name).map(|_| ()),
            ImageChoice::Cloud(o) => (&o.name, "image pull"),
            ImageChoice::Built(o) => (&o.name, "image build"),
        };
        if store::find(dirs, name)?.is_some() || store::can_add(dirs) {
            return Ok(());
        }
        Err(Error::not_found(
            format!(
                "golden image `{name}` is not in the cache {}, and this user cannot add it there \
                 (the shared cache is root's)",
                show(&dirs.images())
            ),
            format!("ask root to run `sudo boma-qvm {how}` once, then run this again"),
        ))
    }

    /// Why this image, in one line, for the log and report.json.
    pub fn reason(&self, explicit: bool) -> String {
        match (self, explicit) {
            (ImageChoice::Built(_), false) => {
                "the default: Debian 13 built offline with debootstrap (Docker, docker-cli, qemu-guest-agent, nftables)".into()
            }
            (ImageChoice::Built(_), true) => "asked for with --image built".into(),
            (ImageChoice::Cloud(_), _) => {
                "asked for with --image cloud: Debian's genericcloud image (no Docker, no guest agent)".into()
            }
            (ImageChoice::Named(n), _) => format!("asked for with --image {n}"),
        }
    }
}

/// Resolve `choice` to a cached image, pulling or building it first if needed. Cheap when the
/// image is cached.
/// Checks the image before handing it out (`Image::verify`).
pub async fn ensure(dirs: &Dirs, choice: &ImageChoice) -> Result<Image> {
    let img = match choice {
        ImageChoice::Named(name) => store::get(dirs, name)?,
        ImageChoice::Cloud(opts) => match store::find(dirs, &opts.name)? {
            Some(img) => img,
            None => pull::pull(dirs, opts).await?.image,
        },
        ImageChoice::Built(opts) => match store::find(dirs, &opts.name)? {
            Some(img) => img,
            None => build::build(dirs, opts).await?,
        },
    };
    let checked = img.clone();
    tokio::task::spawn_blocking(move || checked.verify())
        .await
        .map_err(|e| Error::image(format!("the image check failed: {e}"), "retry"))??;
    Ok(img)
}

impl Image {
    /// Refuse an overlay smaller than this image's virtual disk, before anything is made.
    pub fn check_disk_size(&self, disk_gib: u64) -> Result<()> {
        let golden = overlay::info(&self.disk)?.virtual_size;
        if disk_gib.saturating_mul(1 << 30) < golden {
            return Err(Error::input(
                format!(
                    "--disk-gib {disk_gib} is smaller than image `{}`'s {} GiB disk",
                    self.name,
                    golden.div_ceil(1 << 30)
                ),
                format!(
                    "give --disk-gib {} or more (the default is {})",
                    golden.div_ceil(1 << 30),
                    crate::machine::spec::DEFAULT_DISK_GIB
                ),
            ));
        }
        Ok(())
    }
}

impl Image {
    /// The golden files QEMU reads: the disk, and the kernel and initrd for direct kernel boot.
    fn golden_files(&self) -> Vec<String> {
        let mut files = vec![DISK.to_string()];
        if let BootSpec::Kernel { kernel, initrd, .. } = &self.manifest.boot {
            files.push(kernel.clone());
            files.push(initrd.clone());
        }
        files
    }

    /// Refuse the image unless only root or this user can have written it (its directory, the
    /// cache above it, the manifest and every golden file: owner, mode, no symlinks), and unless
    /// every golden file is still the one recorded when it entered the cache (see the module
    /// docs: cheap when unchanged, a full sha256 when not). Stamps missing from an older
    /// manifest are recorded once the hash matched, when this user may write the manifest.
    pub fn verify(&self) -> Result<()> {
        let what = format!("golden image `{}`", self.name);
        trust::check(&self.dir, &what)?;
        trust::check(&self.dir.join(MANIFEST), &what)?;
        let mut stamps = Vec::new();
        let mut rehashed = false;
        for file in self.golden_files() {
            let path = self.dir.join(&file);
            trust::check(&path, &what)?;
            let recorded = self.manifest.files.iter().find(|s| s.file == file);
            if let Some(s) = recorded
                && s.unchanged(&self.dir)
            {
                stamps.push(s.clone());
                continue;
            }
            let want = match recorded {
                Some(s) => Some(s.sha256.clone()),
                None if file == DISK => Some(self.manifest.disk_sha256.clone()),
                None => None, // an older manifest: nothing recorded to compare with
            };
            tracing::info!(
                "{what}: {} is not the file stamped in its manifest (or none was stamped); \
                 checking its sha256",
                show(&path)
            );
            let got = tool::sha256_file(&path)?;
            rehashed = true;
            if let Some(want) = want
                && got != want
            {
                return Err(Error::image(
                    format!(
                        "{what} was changed after it entered the cache: {} has sha256 {got}, \
                         its manifest says {want}",
                        show(&path)
                    ),
                    format!(
                        "do not use it: find out who changed it, then `boma-qvm image rm {0}` \
                         and build, pull or import it again",
                        self.name
                    ),
                ));
            }
            stamps.push(FileStamp::of(&self.dir, &file, got)?);
        }
        if rehashed {
            self.restamp(stamps);
        }
        Ok(())
    }

    /// Record fresh stamps in the manifest when this user owns it (a failure only costs the next
    /// use another hash).
    fn restamp(&self, stamps: Vec<FileStamp>) {
        use std::os::unix::fs::MetadataExt;
        let mine = std::fs::metadata(self.dir.join(MANIFEST))
            .is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw());
        if !mine {
            return;
        }
        let mut m = self.manifest.clone();
        m.files = stamps;
        match m.write(&self.dir) {
            Ok(()) => tracing::info!("golden image `{}`: stamps recorded", self.name),
            Err(e) => tracing::warn!("golden image `{}`: stamps not recorded: {e}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_parses_aliases_and_names() {
        let auto = "auto".parse::<ImageChoice>().unwrap_err();
        assert_eq!(auto.exit_code(), 2);
        assert!(auto.to_string().contains("no Docker"), "{auto}");
        assert!(matches!(ImageChoice::default(), ImageChoice::Built(_)));
        assert!(matches!(
            "pull".parse::<ImageChoice>().unwrap(),
            ImageChoice::Cloud(_)
        ));
        assert!(matches!(
            BUILT.parse::<ImageChoice>().unwrap(),
            ImageChoice::Built(_)
        ));
        assert_eq!(
            "mine".parse::<ImageChoice>().unwrap(),
            ImageChoice::Named("mine".into())
        );
        assert!("../etc".parse::<ImageChoice>().is_err());
    }

    #[test]
    fn manifest_round_trips_with_kernel_boot() {
        let m = Manifest {
            name: BUILT.into(),
            source: Source::Build {
                suite: "trixie".into(),
                mirror: "m".into(),
                kernel_version: "6.12".into(),
            },
            created: tool::utc_now(),
            disk_sha256: "ab".into(),
            disk_bytes: 1,
            boot: BootSpec::Kernel {
                kernel: KERNEL.into(),
                initrd: INITRD.into(),
                append: DEFAULT_APPEND.into(),
            },
            packages: [("docker.io".to_string(), "26.1.5".to_string())].into(),
            stages: vec![Stage {
                name: "debootstrap".into(),
                secs: 1.5,
            }],
            files: vec![],
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            json.contains(r#""mode":"kernel""#) && json.contains(r#""kind":"build""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
    }
}
