//! Machine-wide defaults: `/etc/boma-qvm/config.env` (written by the integration_test role), or
//! the file `$BOMA_QVM_CONFIG` names. `KEY=value` lines for `BOMA_QVM_*` settings; a variable
//! already set in the environment wins over the file, and a command-line flag wins over both.
//!
//! A missing default file is normal and silent; a file `$BOMA_QVM_CONFIG` names must exist. A
//! line that is not `KEY=value`, or names no boma-qvm setting, is ignored with a one-line warning
//! naming the file and line. Where each applied setting came from is remembered (`origin`), so a
//! bad value is blamed on its line, not on a flag the user never typed (see `settings`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{Error, Result};

pub const DEFAULT_PATH: &str = "/etc/boma-qvm/config.env";
/// Names another config file.
pub const CONFIG_ENV: &str = "BOMA_QVM_CONFIG";

/// Every setting the file may carry (each is also an environment variable).
pub const KNOWN: &[&str] = &[
    "BOMA_QVM_STATE_DIR",
    "BOMA_QVM_CACHE_DIR",
    "BOMA_QVM_RUNS_DIR",
    "BOMA_QVM_MIN_FREE_MIB",
    "BOMA_QVM_MAX_VMS",
    "BOMA_QVM_IMAGE_URL",
    "BOMA_QVM_DEBIAN_MIRROR",
    "BOMA_QVM_EXE",
    "BOMA_QVM_LOG",
    // Where the role's Ansible lives (the toolchain work; not judged here).
    "BOMA_QVM_ANSIBLE_DIR",
];

/// The config file to read, and whether the user named it (`$BOMA_QVM_CONFIG`).
pub fn path() -> (PathBuf, bool) {
    match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
        Some(p) => (PathBuf::from(p), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    }
}

/// One `KEY=value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: String,
    pub value: String,
    /// 1-based.
    pub line: usize,
}

/// The settings in `text`, and a warning for every line that is ignored. `file` only names the
/// file in warnings.
pub fn parse(text: &str, file: &Path) -> (Vec<Setting>, Vec<String>) {
    let mut settings: Vec<Setting> = Vec::new();
    let mut warnings = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let at = format!("{} line {line}", file.display());
        let l = l.strip_prefix("export ").unwrap_or(l);
        let Some((key, value)) = l.split_once('=').map(|(k, v)| (k.trim(), v.trim())) else {
            warnings.push(format!("{at}: `{raw}` is not KEY=value; ignored"));
            continue;
        };
        let shell_name = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !shell_name {
            warnings.push(format!("{at}: `{raw}` is not KEY=value; ignored"));
        } else if key == CONFIG_ENV {
            warnings.push(format!(
                "{at}: {CONFIG_ENV} names this file and cannot be set in it; ignored"
            ));
        } else if !KNOWN.contains(&key) {
            warnings.push(format!(
                "{at}: {key} is not a boma-qvm setting (they are {}); ignored",
                KNOWN.join(", ")
            ));
        } else {
            if value.len() >= 2
                && (value.starts_with('"') && value.ends_with('"')
                    || value.starts_with('\'') && value.ends_with('\''))
            {
                warnings.push(format!(
                    "{at}: the quotes around {key}'s value are part of it (write KEY=value, no quotes)"
                ));
            }
            if let Some(prev) = settings.iter().position(|s| s.key == key) {
                let before = settings.remove(prev);
                warnings.push(format!(
                    "{at}: {key} was already set on line {}; this line wins",
                    before.line
                ));
            }
            settings.push(Setting {
                key: key.to_string(),
                value: value.to_string(),
                line,
            });
        }
    }
    (settings, warnings)
}

/// Where a setting's current value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File { path: PathBuf, line: usize },
    Environment,
    Unset,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "line {line} of {}", path.display()),
            Origin::Environment => write!(f, "the environment"),
            Origin::Unset => write!(f, "nowhere (unset)"),
        }
    }
}

#[derive(Debug, Default)]
struct Loaded {
    file: Option<PathBuf>,
    applied: Vec<Setting>,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();

/// Where the value of `key` in the environment came from: the config file (which line), or the
/// environment itself.
pub fn origin(key: &str) -> Origin {
    if let Some(l) = LOADED.get()
        && let (Some(path), Some(s)) = (&l.file, l.applied.iter().find(|s| s.key == key))
    {
        return Origin::File {
            path: path.clone(),
            line: s.line,
        };
    }
    if std::env::var_os(key).is_some() {
        Origin::Environment
    } else {
        Origin::Unset
    }
}

/// The config file that set `key` in this process's environment (`load` did), if one did.
pub fn source_of(key: &str) -> Option<&'static Path> {
    let l = LOADED.get()?;
    l.applied
        .iter()
        .any(|s| s.key == key)
        .then_some(l.file.as_deref()?)
}

/// The value `file` gives `key`, if any (the last assignment wins, as in a shell). For library
/// callers that never ran `load` (tests, other programs).
pub fn value_in(file: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    parse(&text, file)
        .0
        .into_iter()
        .filter(|s| s.key == key)
        .map(|s| s.value)
        .next_back()
}

/// Read the config file and put the settings the environment does not already set into it.
/// Returns the warnings to print (one line each). Refuses a `$BOMA_QVM_CONFIG` that is missing,
/// and a config file that is a directory or cannot be read.
///
/// Call it first thing in `main`, before any thread exists (it sets environment variables).
pub fn load() -> Result<Vec<String>> {
    let (file, named) = path();
    let named_by = if named {
        format!("{CONFIG_ENV}={}", file.display())
    } else {
        format!("the default config file {}", file.display())
    };
    let fix = if named {
        format!("point {CONFIG_ENV} at a KEY=value file, or unset it to use {DEFAULT_PATH}")
    } else {
        format!("make {DEFAULT_PATH} a readable KEY=value file, or remove it")
    };
    let text = match std::fs::read(&file) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => {
            let _ = LOADED.set(Loaded::default());
            return Ok(Vec::new());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(
                format!("the config file {} ({CONFIG_ENV})", file.display()),
                fix,
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
            return Err(Error::input(
                format!("{named_by} is a directory, not a config file"),
                fix,
            ));
        }
        Err(e) => {
            return Err(Error::input(format!("cannot read {named_by}: {e}"), fix));
        }
    };
    let (settings, warnings) = parse(&text, &file);
    let applied: Vec<Setting> = settings
        .into_iter()
        .filter(|s| std::env::var_os(&s.key).is_none())
        .collect();
    for s in &applied {
        // SAFETY: called first in main, before any thread exists (see above).
        unsafe { std::env::set_var(&s.key, &s.value) };
    }
    let _ = LOADED.set(Loaded {
        file: Some(file),
        applied,
    });
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_with_line_numbers_and_a_warning_per_ignored_line() {
        let (got, warnings) = parse(
            "# c\nBOMA_QVM_MAX_VMS=2\n\nPATH=/x\n BOMA_QVM_CACHE_DIR = /var/cache/boma-qvm \nnonsense\n\
             export BOMA_QVM_LOG=debug\nBOMA_QVM_MAX_VM=3\nBOMA_QVM_CONFIG=/y\n=5\n",
            Path::new("/etc/boma-qvm/config.env"),
        );
        let kv: Vec<(&str, &str, usize)> = got
            .iter()
            .map(|s| (s.key.as_str(), s.value.as_str(), s.line))
            .collect();
        assert_eq!(
            kv,
            vec![
                ("BOMA_QVM_MAX_VMS", "2", 2),
                ("BOMA_QVM_CACHE_DIR", "/var/cache/boma-qvm", 5),
                ("BOMA_QVM_LOG", "debug", 7),
            ]
        );
        let w = warnings.join("\n");
        for want in [
            "config.env line 4: PATH is not a boma-qvm setting",
            "config.env line 6: `nonsense` is not KEY=value; ignored",
            "config.env line 8: BOMA_QVM_MAX_VM is not a boma-qvm setting",
            "config.env line 9: BOMA_QVM_CONFIG names this file",
            "config.env line 10: `=5` is not KEY=value",
        ] {
            assert!(w.contains(want), "{want} missing from:\n{w}");
        }
        assert_eq!(warnings.len(), 5, "{w}");
    }

    #[test]
    fn quotes_and_repeats_are_warned_about() {
        let (got, warnings) = parse(
            "BOMA_QVM_MAX_VMS=1\nBOMA_QVM_CACHE_DIR=\"/c\"\nBOMA_QVM_MAX_VMS=2\n",
            Path::new("f"),
        );
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].value, "2");
        assert!(warnings[0].contains("f line 2: the quotes"), "{warnings:?}");
        assert!(
            warnings[1].contains("f line 3: BOMA_QVM_MAX_VMS was already set on line 1"),
            "{warnings:?}"
        );
    }
}
