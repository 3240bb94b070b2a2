//! The QEMU process: its argv (`argv`, pure) and launching it (`process`).

pub mod argv;

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Resolve the QEMU binary (a path, or a name looked up on PATH), or say how to install it.
pub fn find_binary(bin: &Path) -> Result<PathBuf> {
    let found = if bin.components().count() > 1 {
        bin.is_file().then(|| bin.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(bin))
                .find(|c| c.is_file())
        })
    };
    found.ok_or_else(|| Error::MissingTool {
        program: bin.display().to_string(),
        fix: "install QEMU: `apt-get install --no-install-recommends qemu-system-x86` (or `make setup`)".into(),
    })
}
