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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    pub state: PathBuf,
    pub cache: PathBuf,
    pub runs: PathBuf,
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

impl Dirs {
    /// Resolve from the environment (overrides, then XDG, then the home-directory defaults).
    pub fn from_env() -> Self {
        let state = env_dir("BOMA_QVM_STATE_DIR").unwrap_or_else(|| {
            env_dir("XDG_STATE_HOME")
                .unwrap_or_else(|| home().join(".local/state"))
                .join("boma-qvm")
        });
        let cache = env_dir("BOMA_QVM_CACHE_DIR").unwrap_or_else(|| {
            env_dir("XDG_CACHE_HOME")
                .unwrap_or_else(|| home().join(".cache"))
                .join("boma-qvm")
        });
        let runs = env_dir("BOMA_QVM_RUNS_DIR").unwrap_or_else(|| home().join("integration-runs"));
        Dirs { state, cache, runs }
    }

    /// All three under one root (tests).
    pub fn under(root: &Path) -> Self {
        Dirs {
            state: root.join("state"),
            cache: root.join("cache"),
            runs: root.join("runs"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_lays_out_state_cache_runs() {
        let d = Dirs::under(Path::new("/x"));
        assert_eq!(d.vm("boma-it-a"), PathBuf::from("/x/state/vms/boma-it-a"));
        assert_eq!(d.images(), PathBuf::from("/x/cache/images"));
        assert_eq!(d.net(), PathBuf::from("/x/state/net"));
    }
}
