//! Where boma-qvm keeps things. Lima-style: one directory per VM instance.
//!
//! - state  (`$BOMA_QVM_STATE_DIR`, else `$XDG_STATE_HOME/boma-qvm`, else `~/.local/state/boma-qvm`)
//!   - `vms/<name>/`  the VM's run directory: spec, pids, sockets, console log, events, overlay
//!   - `net/`         the shared network's dnsmasq config, pid and lease file
//!   - `lock`         the one-VM-at-a-time lock
//! - cache  (`$BOMA_QVM_CACHE_DIR`, else `$XDG_CACHE_HOME/boma-qvm`, else `~/.cache/boma-qvm`)
//!   - `images/`      golden images (read-only files), kernels, manifests
//! - runs   (`$BOMA_QVM_RUNS_DIR`, else `~/integration-runs`): per-cycle reports and post-mortems
//!
//! Unix socket paths are limited to 107 bytes, so keep the state dir short when overriding it.

use std::path::{Path, PathBuf};

use crate::config_file::{self, Origin};
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    pub state: PathBuf,
    pub cache: PathBuf,
    pub runs: PathBuf,
    /// Where each came from, for messages about a directory that cannot be used.
    pub origins: Origins,
}

/// One of the three directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    State,
    Cache,
    Runs,
}

impl DirKind {
    pub const ALL: [DirKind; 3] = [DirKind::State, DirKind::Cache, DirKind::Runs];

    /// The environment variable (and config.env key) that sets it.
    pub fn var(self) -> &'static str {
        match self {
            DirKind::State => "BOMA_QVM_STATE_DIR",
            DirKind::Cache => "BOMA_QVM_CACHE_DIR",
            DirKind::Runs => "BOMA_QVM_RUNS_DIR",
        }
    }

    /// The command-line flag that sets it.
    pub fn flag(self) -> &'static str {
        match self {
            DirKind::State => "--state-dir",
            DirKind::Cache => "--cache-dir",
            DirKind::Runs => "cycle --runs-dir",
        }
    }

    pub fn what(self) -> &'static str {
        match self {
            DirKind::State => "state directory",
            DirKind::Cache => "cache directory",
            DirKind::Runs => "runs directory",
        }
    }
}

/// Where a directory setting came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DirOrigin {
    /// The command-line flag.
    Flag,
    /// Its variable, set in the environment or the config file.
    Setting(Origin),
    /// `$XDG_STATE_HOME` / `$XDG_CACHE_HOME` plus `boma-qvm`.
    Xdg(&'static str),
    /// Under `$HOME`.
    #[default]
    Home,
}

/// Where each of `Dirs`' directories came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origins {
    pub state: DirOrigin,
    pub cache: DirOrigin,
    pub runs: DirOrigin,
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `var`, else `$xdg/boma-qvm`, else `~/home_rel/boma-qvm` (or `~/home_rel` with no XDG).
fn resolve(kind: DirKind, xdg: Option<&'static str>, home_rel: &str) -> (PathBuf, DirOrigin) {
    if let Some(d) = env_dir(kind.var()) {
        return (d, DirOrigin::Setting(config_file::origin(kind.var())));
    }
    match xdg {
        Some(x) => match env_dir(x) {
            Some(d) => (d.join("boma-qvm"), DirOrigin::Xdg(x)),
            None => (home().join(home_rel).join("boma-qvm"), DirOrigin::Home),
        },
        None => (home().join(home_rel), DirOrigin::Home),
    }
}

impl Dirs {
    /// Resolve from the environment (overrides, then XDG, then the home-directory defaults).
    pub fn from_env() -> Self {
        let (state, s) = resolve(DirKind::State, Some("XDG_STATE_HOME"), ".local/state");
        let (cache, c) = resolve(DirKind::Cache, Some("XDG_CACHE_HOME"), ".cache");
        let (runs, r) = resolve(DirKind::Runs, None, "integration-runs");
        Dirs {
            state,
            cache,
            runs,
            origins: Origins {
                state: s,
                cache: c,
                runs: r,
            },
        }
    }

    /// All three under one root (tests).
    pub fn under(root: &Path) -> Self {
        Dirs {
            state: root.join("state"),
            cache: root.join("cache"),
            runs: root.join("runs"),
            origins: Origins::default(),
        }
    }

    pub fn get(&self, kind: DirKind) -> &Path {
        match kind {
            DirKind::State => &self.state,
            DirKind::Cache => &self.cache,
            DirKind::Runs => &self.runs,
        }
    }

    pub fn origin(&self, kind: DirKind) -> &DirOrigin {
        match kind {
            DirKind::State => &self.origins.state,
            DirKind::Cache => &self.origins.cache,
            DirKind::Runs => &self.origins.runs,
        }
    }

    /// Refuse a directory setting that cannot work, naming the setting, where it came from and
    /// the fix: a regular file (or a path through one), a kernel pseudo-filesystem such as /proc,
    /// or (with `write`) a directory this user cannot write or create. A directory that does not
    /// exist yet is fine when it can be created. Nothing is created here.
    pub fn check(&self, kind: DirKind, write: bool) -> Result<()> {
        let dir = self.get(kind);
        let origin = self.origin(kind);
        let from = match origin {
            DirOrigin::Flag => kind.flag().to_string(),
            DirOrigin::Setting(o) => format!("{} from {o}", kind.var()),
            DirOrigin::Xdg(x) => format!("${x}/boma-qvm"),
            DirOrigin::Home => "the default under $HOME".to_string(),
        };
        let what = format!("the {} {} ({from})", kind.what(), dir.display());
        let fix = match origin {
            DirOrigin::Flag => format!(
                "pass {} a directory this user can write, or leave it out",
                kind.flag()
            ),
            DirOrigin::Setting(Origin::File { path, line }) => format!(
                "fix line {line} of {}: {}=<a directory this user can write>, or remove the line",
                path.display(),
                kind.var()
            ),
            _ => format!(
                "point {} (or {}) at a directory this user can write{}",
                kind.var(),
                kind.flag(),
                if matches!(origin, DirOrigin::Setting(_)) {
                    ", or unset it for the default"
                } else {
                    ""
                }
            ),
        };
        match unusable(dir, write) {
            None => Ok(()),
            Some(why) => Err(Error::input(format!("{what} {why}"), fix)),
        }
    }

    pub fn vms(&self) -> PathBuf {
        self.state.join("vms")
    }

    pub fn vm(&self, name: &str) -> PathBuf {
        self.vms().join(name)
    }

    pub fn net(&self) -> PathBuf {
        self.state.join("net")
    }

    pub fn images(&self) -> PathBuf {
        self.cache.join("images")
    }

    pub fn lock(&self) -> PathBuf {
        self.state.join("lock")
    }
}

/// Why `dir` cannot serve as a boma-qvm directory, or `None` when it can.
pub(crate) fn unusable(dir: &Path, write: bool) -> Option<String> {
    use nix::unistd::{AccessFlags, access};
    // The directory itself if it exists, else the nearest ancestor that does (it gets created).
    let mut probe = dir;
    let meta = loop {
        match std::fs::metadata(probe) {
            Ok(m) => break m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match probe.parent() {
                Some(p) if !p.as_os_str().is_empty() => probe = p,
                _ => return None, // a relative path under the current directory
            },
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => match probe.parent() {
                Some(p) => probe = p,
                None => return Some(format!("cannot be used: {e}")),
            },
            Err(e) => return Some(format!("cannot be checked: {e}")),
        }
    };
    let existing = probe == dir;
    if !meta.is_dir() {
        let kind = if meta.is_file() {
            "a regular file"
        } else {
            "not a directory"
        };
        return Some(if existing {
            format!("is {kind}, not a directory")
        } else {
            format!("cannot be created: {} is {kind}", probe.display())
        });
    }
    if let Some(fs) = pseudo_filesystem(probe) {
        return Some(format!(
            "is on {fs}, a kernel pseudo-filesystem where nothing can be kept{}",
            if existing {
                String::new()
            } else {
                format!(" ({} is there)", probe.display())
            }
        ));
    }
    if write && access(probe, AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
        return Some(if existing {
            "is not writable by this user".to_string()
        } else {
            format!(
                "cannot be created: {} is not writable by this user",
                probe.display()
            )
        });
    }
    None
}

/// The name of the kernel pseudo-filesystem `path` is on (/proc, /sys, ...), if it is on one.
fn pseudo_filesystem(path: &Path) -> Option<&'static str> {
    use nix::sys::statfs::{self as fs, statfs};
    let t = statfs(path).ok()?.filesystem_type();
    [
        (fs::PROC_SUPER_MAGIC, "procfs (/proc)"),
        (fs::SYSFS_MAGIC, "sysfs (/sys)"),
        (fs::CGROUP_SUPER_MAGIC, "cgroupfs"),
        (fs::FsType(0x6367_7270), "cgroup2fs"),
        (fs::DEBUGFS_MAGIC, "debugfs"),
        (fs::TRACEFS_MAGIC, "tracefs"),
        (fs::SECURITYFS_MAGIC, "securityfs"),
        (fs::DEVPTS_SUPER_MAGIC, "devpts"),
        (fs::BPF_FS_MAGIC, "bpffs"),
        (fs::NSFS_MAGIC, "nsfs"),
    ]
    .into_iter()
    .find(|(m, _)| *m == t)
    .map(|(_, name)| name)
}

/// Write `contents` to `path` through a temporary file beside it and a rename, so a reader
/// never sees half a file (a crash leaves the old one or the new one).
pub fn write_atomic(path: &Path, contents: impl AsRef<[u8]>) -> crate::Result<()> {
    write_atomic_as(path, contents.as_ref(), None)
}

/// [`write_atomic`], the file getting exactly `mode` whatever the umask.
pub fn write_atomic_mode(path: &Path, contents: impl AsRef<[u8]>, mode: u32) -> crate::Result<()> {
    write_atomic_as(path, contents.as_ref(), Some(mode))
}

/// The temporary file [`write_atomic`] writes beside `path` (a crash may leave it).
pub fn atomic_tmp(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

fn write_atomic_as(path: &Path, contents: &[u8], mode: Option<u32>) -> crate::Result<()> {
    use crate::error::IoContext;
    use std::os::unix::fs::PermissionsExt;
    let tmp = atomic_tmp(path);
    std::fs::write(&tmp, contents).ctx(|| format!("writing {}", tmp.display()))?;
    if let Some(mode) = mode {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .ctx(|| format!("setting the mode of {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).ctx(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_dirs_say_why() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert_eq!(unusable(t.path(), true), None);
        assert_eq!(unusable(&t.path().join("new/deeper"), true), None);
        assert_eq!(
            unusable(&file, false).unwrap(),
            "is a regular file, not a directory"
        );
        let under = unusable(&file.join("x"), true).unwrap();
        assert!(under.starts_with("cannot be created: ") && under.ends_with("f is a regular file"));
        assert!(
            unusable(Path::new("/proc/boma-qvm"), false)
                .unwrap()
                .contains("procfs")
        );
        assert!(unusable(Path::new("/sys/fs/x"), true).is_some());
    }

    #[test]
    fn a_bad_dir_names_its_setting_and_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("f");
        std::fs::write(&file, "").unwrap();
        let mut d = Dirs::under(t.path());
        d.state = file.clone();
        d.origins.state = DirOrigin::Setting(Origin::File {
            path: "/etc/boma-qvm/config.env".into(),
            line: 3,
        });
        let e = d.check(DirKind::State, false).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let m = e.to_string();
        assert!(
            m.contains(
                "(BOMA_QVM_STATE_DIR from line 3 of /etc/boma-qvm/config.env) is a regular file"
            ) && m.contains("fix: fix line 3 of /etc/boma-qvm/config.env"),
            "{m}"
        );
        d.origins.state = DirOrigin::Flag;
        let m = d.check(DirKind::State, true).unwrap_err().to_string();
        assert!(
            m.contains("(--state-dir)") && m.contains("pass --state-dir"),
            "{m}"
        );
        d.state = t.path().join("ok");
        d.check(DirKind::State, true).unwrap();
    }

    #[test]
    fn under_lays_out_state_cache_runs() {
        let d = Dirs::under(Path::new("/x"));
        assert_eq!(d.vm("boma-it-a"), PathBuf::from("/x/state/vms/boma-it-a"));
        assert_eq!(d.images(), PathBuf::from("/x/cache/images"));
        assert_eq!(d.net(), PathBuf::from("/x/state/net"));
    }
}
