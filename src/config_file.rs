//! Machine-wide defaults: `/etc/boma-qvm/config.env` (written by the integration_test role), or
//! the file `$BOMA_QVM_CONFIG` names. `KEY=value` lines for `BOMA_QVM_*` settings; a variable
//! already set in the environment wins over the file, and a command-line flag wins over both.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub const DEFAULT_PATH: &str = "/etc/boma-qvm/config.env";

pub fn path() -> PathBuf {
    std::env::var_os("BOMA_QVM_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

/// The `BOMA_QVM_*` assignments in `text` (comments, blank lines and other keys ignored).
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| k.starts_with("BOMA_QVM_") && k != "BOMA_QVM_CONFIG")
        .collect()
}

/// The settings from `file` that the environment does not already set.
pub fn defaults_to_apply(file: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Vec::new();
    };
    parse(&text)
        .into_iter()
        .filter(|(k, _)| std::env::var_os(k).is_none())
        .collect()
}

/// The value `file` gives `key`, if any (the last assignment wins, as in a shell).
pub fn value_in(file: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    parse(&text)
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .next_back()
}

/// The file [`apply`] read and the keys it set (those the environment did not already set).
static APPLIED: OnceLock<(PathBuf, Vec<String>)> = OnceLock::new();

/// Put `file`'s settings into this process's environment where the environment does not set
/// them already, and remember which ones came from the file (see [`source_of`]).
///
/// # Safety
/// Sets environment variables: call it first thing in `main`, before any other thread exists.
pub unsafe fn apply(file: &Path) {
    let set = defaults_to_apply(file);
    for (k, v) in &set {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::set_var(k, v) };
    }
    let _ = APPLIED.set((
        file.to_path_buf(),
        set.into_iter().map(|(k, _)| k).collect(),
    ));
}

/// Where the value of setting `key` came from: `Some(file)` when [`apply`] set it from that file,
/// `None` when it is the process's own environment (or unset).
pub fn source_of(key: &str) -> Option<&'static Path> {
    let (file, keys) = APPLIED.get()?;
    keys.iter().any(|k| k == key).then_some(file.as_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_in_reads_one_key_last_wins() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.env");
        std::fs::write(
            &f,
            "BOMA_QVM_ANSIBLE_DIR=/a\n# BOMA_QVM_ANSIBLE_DIR=/commented\nBOMA_QVM_ANSIBLE_DIR=/b\n",
        )
        .unwrap();
        assert_eq!(value_in(&f, "BOMA_QVM_ANSIBLE_DIR").as_deref(), Some("/b"));
        assert_eq!(value_in(&f, "BOMA_QVM_MAX_VMS"), None);
        assert_eq!(value_in(&d.path().join("absent"), "BOMA_QVM_X"), None);
    }

    #[test]
    fn only_boma_qvm_keys() {
        let got = parse(
            "# c\nBOMA_QVM_MAX_VMS=2\n\nPATH=/x\n BOMA_QVM_CACHE_DIR = /var/cache/boma-qvm \nnonsense\n",
        );
        assert_eq!(
            got,
            vec![
                ("BOMA_QVM_MAX_VMS".to_string(), "2".to_string()),
                (
                    "BOMA_QVM_CACHE_DIR".to_string(),
                    "/var/cache/boma-qvm".to_string()
                )
            ]
        );
    }
}
