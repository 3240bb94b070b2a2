//! The external programs boma-qvm shells out to: find one on PATH, or fail saying how to
//! install it. One lookup for every module (QEMU, network, image, seed, SSH, Ansible).

use crate::{Error, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `program` as an executable file: a path is checked as given, a bare name looked up on PATH.
pub fn find(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|c| executable(c))
}

/// [`find`], or `Error::MissingTool` with `fix`.
pub fn require(program: &str, fix: &str) -> Result<PathBuf> {
    find(program).ok_or_else(|| Error::MissingTool {
        program: program.into(),
        fix: fix.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_names_on_path_and_paths_as_given() {
        assert!(find("sh").is_some());
        assert_eq!(find("/bin/sh"), Some(PathBuf::from("/bin/sh")));
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(find(plain.to_str().unwrap()).is_none(), "not executable");
        let e = require("no-such-tool-boma", "install it").unwrap_err();
        assert_eq!(e.exit_code(), 3);
        assert!(e.to_string().contains("install it"));
    }
}
