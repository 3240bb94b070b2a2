//! The QEMU process: its argv (`argv`, pure) and launching it (`process`).

pub mod account;
pub mod argv;

use crate::Result;
use std::path::{Path, PathBuf};

/// Resolve the QEMU binary (a path, or a name looked up on PATH), or say how to install it.
pub fn find_binary(bin: &Path) -> Result<PathBuf> {
    crate::tools::require(
        &bin.display().to_string(),
        "install QEMU: `apt-get install --no-install-recommends qemu-system-x86` (or `make setup`)",
    )
}
