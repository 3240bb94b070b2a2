//! The `BOMA_QVM_*` settings (environment or config.env) checked in one place, so a bad value is
//! refused with its name, where it came from (which line of which file) and the fix, before any
//! command uses it, and so `doctor` reports exactly what the other commands would refuse.
//!
//! Without this, `BOMA_QVM_MIN_FREE_MIB=-5` in config.env surfaced as clap's "invalid value for
//! '--min-free-mib'" (a flag never typed), and `start` silently ignored it.

use crate::Error;
use crate::config_file::{self, Origin};
use crate::paths::{DirKind, Dirs};

/// One bad setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: &'static str,
    pub value: String,
    pub origin: Origin,
    /// What is wrong with the value.
    pub problem: String,
    /// What a good value looks like.
    pub want: String,
}

impl Problem {
    pub fn error(&self) -> Error {
        let fix = match &self.origin {
            Origin::File { path, line } => format!(
                "fix line {line} of {}: {}={}, or remove the line",
                path.display(),
                self.key,
                self.want
            ),
            _ => format!("set {} to {}, or unset it", self.key, self.want),
        };
        Error::input(
            format!(
                "{}={} (from {}) {}",
                self.key, self.value, self.origin, self.problem
            ),
            fix,
        )
    }
}

/// Why `value` is wrong for `key`, and what a good one looks like; `None` when it is good.
fn judge(key: &str, value: &str) -> Option<(String, String)> {
    let bad = |problem: String, want: &str| Some((problem, want.to_string()));
    match key {
        "BOMA_QVM_MIN_FREE_MIB" => match value.parse::<u64>() {
            Ok(_) => None,
            Err(e) => bad(
                format!("is not a whole number of MiB ({e})"),
                "<MiB of free RAM a VM needs to start, e.g. 4096>",
            ),
        },
        "BOMA_QVM_MAX_VMS" => match value.parse::<usize>() {
            Ok(n) if n >= 1 => None,
            Ok(_) => bad("allows no VM at all".into(), "<VMs at once, at least 1>"),
            Err(e) => bad(
                format!("is not a whole number of VMs ({e})"),
                "<VMs at once, at least 1>",
            ),
        },
        "BOMA_QVM_IMAGE_URL" => crate::guest::image::pull::url_problem(value).and_then(|why| {
            bad(
                format!("is not a usable image server URL: {why}"),
                crate::guest::image::pull::DEFAULT_BASE_URL,
            )
        }),
        "BOMA_QVM_DEBIAN_MIRROR" => {
            let why = match reqwest::Url::parse(value) {
                Err(e) => Some(e.to_string()),
                Ok(u) if !matches!(u.scheme(), "http" | "https" | "file") => Some(format!(
                    "the scheme is `{}`; debootstrap is given http, https or file mirrors",
                    u.scheme()
                )),
                Ok(_) => None,
            };
            why.and_then(|w| {
                bad(
                    format!("is not a Debian mirror URL: {w}"),
                    crate::guest::image::build::DEFAULT_MIRROR,
                )
            })
        }
        "BOMA_QVM_EXE" => {
            use std::os::unix::fs::PermissionsExt;
            match std::fs::metadata(value) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => None,
                Ok(_) => bad(
                    "is not an executable file".into(),
                    "<the path of the boma-qvm binary>",
                ),
                Err(e) => bad(
                    format!("cannot be used: {e}"),
                    "<the path of the boma-qvm binary>",
                ),
            }
        }
        "BOMA_QVM_LOG" => match tracing_subscriber::EnvFilter::try_new(value) {
            Ok(_) => None,
            Err(e) => bad(
                format!("is not a log filter ({e})"),
                "<a tracing filter, e.g. boma_qvm=debug>",
            ),
        },
        _ => None,
    }
}

/// Every set `BOMA_QVM_*` setting whose value is wrong (the directories: see `Dirs::check`).
pub fn check() -> Vec<Problem> {
    config_file::KNOWN
        .iter()
        .filter_map(|key| {
            let value = std::env::var(key).ok()?;
            let (problem, want) = judge(key, &value)?;
            Some(Problem {
                key,
                value,
                origin: config_file::origin(key),
                problem,
                want,
            })
        })
        .collect()
}

/// Everything wrong with the settings and the directories they name, as the errors the other
/// commands would stop with (`doctor`).
pub fn problems(dirs: &Dirs) -> Vec<Error> {
    let mut out: Vec<Error> = check().iter().map(Problem::error).collect();
    out.extend(
        DirKind::ALL
            .into_iter()
            .filter_map(|k| dirs.check(k, true).err()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_judged() {
        for (k, v) in [
            ("BOMA_QVM_MIN_FREE_MIB", "4096"),
            ("BOMA_QVM_MAX_VMS", "2"),
            ("BOMA_QVM_IMAGE_URL", "http://127.0.0.1:8080/images/"),
            ("BOMA_QVM_DEBIAN_MIRROR", "file:///srv/mirror"),
            ("BOMA_QVM_EXE", "/bin/sh"),
            ("BOMA_QVM_LOG", "boma_qvm=debug,warn"),
        ] {
            assert_eq!(judge(k, v), None, "{k}={v}");
        }
        let plain = tempfile::NamedTempFile::new().unwrap();
        let plain = plain.path().to_str().unwrap();
        for (k, v, says) in [
            ("BOMA_QVM_MIN_FREE_MIB", "-5", "whole number of MiB"),
            ("BOMA_QVM_MIN_FREE_MIB", "lots", "whole number of MiB"),
            ("BOMA_QVM_MAX_VMS", "0", "no VM at all"),
            ("BOMA_QVM_IMAGE_URL", "ht!tp:/bad url", "relative URL"),
            (
                "BOMA_QVM_DEBIAN_MIRROR",
                "deb.debian.org",
                "not a Debian mirror URL",
            ),
            ("BOMA_QVM_EXE", plain, "not an executable"),
            ("BOMA_QVM_EXE", "/nonexistent/boma-qvm", "cannot be used"),
            ("BOMA_QVM_LOG", "boma_qvm=loud", "not a log filter"),
        ] {
            let (problem, _) = judge(k, v).unwrap_or_else(|| panic!("{k}={v} passed"));
            assert!(problem.contains(says), "{k}={v}: {problem}");
        }
    }

    #[test]
    fn the_error_names_the_line_and_the_fix() {
        let p = Problem {
            key: "BOMA_QVM_MIN_FREE_MIB",
            value: "-5".into(),
            origin: Origin::File {
                path: "/etc/boma-qvm/config.env".into(),
                line: 4,
            },
            problem: "is not a whole number of MiB".into(),
            want: "<MiB>".into(),
        };
        let e = p.error();
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            e.to_string(),
            "BOMA_QVM_MIN_FREE_MIB=-5 (from line 4 of /etc/boma-qvm/config.env) is not a whole \
             number of MiB\n  fix: fix line 4 of /etc/boma-qvm/config.env: \
             BOMA_QVM_MIN_FREE_MIB=<MiB>, or remove the line"
        );
    }
}
