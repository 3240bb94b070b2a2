//! The external programs boma-qvm shells out to: find one on PATH, or fail saying how to
//! install it. One lookup for every module (QEMU, network, image, seed, SSH, Ansible).
//!
//! A family of programs can also be taken from a directory a setting names, ahead of PATH
//! ([`locate`]): Ansible lives in a venv (`/opt/boma-qvm-ansible/bin`) that nothing puts on
//! PATH, so the integration_test role records it as `BOMA_QVM_ANSIBLE_DIR` in
//! `/etc/boma-qvm/config.env` instead.

use crate::{Error, Result};
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `program` as an executable file: a path is checked as given, a bare name looked up on PATH.
pub fn find(program: &str) -> Option<PathBuf> {
    find_on(program, &std::env::var_os("PATH").unwrap_or_default())
}

fn find_on(program: &str, path: &OsStr) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    std::env::split_paths(path)
        .map(|d| d.join(program))
        .find(|c| executable(c))
}

/// [`find`], or `Error::MissingTool` with `fix`.
pub fn require(program: &str, fix: &str) -> Result<PathBuf> {
    find(program).ok_or_else(|| Error::missing_tool(program, fix))
}

/// Where a program is taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The directory the setting `var` names; `file` is the config file that set it (`None`:
    /// the process environment).
    Setting {
        var: String,
        dir: PathBuf,
        file: Option<PathBuf>,
    },
    /// The PATH lookup.
    Path,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Setting { var, dir, file } => {
                write!(f, "{var}={}", dir.display())?;
                match file {
                    Some(file) => write!(f, " (set in {})", file.display()),
                    None => write!(f, " (set in the environment)"),
                }
            }
            Origin::Path => write!(f, "PATH"),
        }
    }
}

/// A program and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub path: PathBuf,
    pub origin: Origin,
}

/// The setting `var` (a directory), if it is set and not empty, and the config file that set it
/// (`None`: the environment). The environment wins; without it the config file is read here,
/// so library callers that never ran [`crate::config_file::apply`] (tests, other programs) get
/// the same answer as the CLI.
fn setting(var: &str) -> Option<(PathBuf, Option<PathBuf>)> {
    setting_in(var, std::env::var_os(var), &crate::config_file::path().0)
}

fn setting_in(
    var: &str,
    env: Option<std::ffi::OsString>,
    file: &Path,
) -> Option<(PathBuf, Option<PathBuf>)> {
    if let Some(dir) = env.filter(|v| !v.is_empty()) {
        return Some((
            PathBuf::from(dir),
            crate::config_file::source_of(var).map(Path::to_path_buf),
        ));
    }
    let dir = crate::config_file::value_in(file, var).filter(|v| !v.is_empty())?;
    Some((PathBuf::from(dir), Some(file.to_path_buf())))
}

/// `program` from the directory the setting `dir_var` names when it is set, else from PATH.
///
/// A set but wrong setting is an error, not a fall-back to PATH: the setting is how the operator
/// (or the role) chose this program, and silently running another one from PATH (say Debian 12's
/// ansible-core 2.14, too old for the Debian 13 guest) would hide that the choice went stale.
/// `fix` says how to install the program; the error adds how to set `dir_var`.
pub fn locate(program: &str, dir_var: &str, fix: &str) -> Result<Located> {
    locate_with(
        program,
        setting(dir_var),
        dir_var,
        &std::env::var_os("PATH").unwrap_or_default(),
        fix,
    )
}

fn locate_with(
    program: &str,
    setting: Option<(PathBuf, Option<PathBuf>)>,
    dir_var: &str,
    path: &OsStr,
    fix: &str,
) -> Result<Located> {
    let Some((dir, file)) = setting else {
        return match find_on(program, path) {
            Some(p) => Ok(Located {
                path: p,
                origin: Origin::Path,
            }),
            None => {
                let config = crate::config_file::path().0;
                Err(Error::MissingTool {
                    program: program.to_string(),
                    looked_in: format!(
                        "on PATH, and {dir_var} is not set (neither in the environment nor in {})",
                        config.display()
                    ),
                    fix: format!(
                        "set {dir_var}=<the directory holding `{program}`> in {} (`make setup` records \
                         the Ansible that applies the integration_test role there, e.g. \
                         /opt/boma-qvm-ansible/bin). {fix}",
                        config.display()
                    ),
                })
            }
        };
    };
    let p = dir.join(program);
    let edit = match &file {
        Some(f) => format!("fix {dir_var} in {}", f.display()),
        None => format!("fix {dir_var} in your environment"),
    };
    let origin = Origin::Setting {
        var: dir_var.to_string(),
        dir,
        file,
    };
    if executable(&p) {
        return Ok(Located { path: p, origin });
    }
    Err(Error::MissingTool {
        program: program.to_string(),
        looked_in: format!("in {origin}"),
        fix: format!(
            "{edit}: it must name the directory that holds `{program}` (re-running `make setup` \
             records the Ansible that applies the role there); or unset it to use PATH. {fix}"
        ),
    })
}

// Running them: one place for every module (network, image, seed, SSH).

/// The first line `program args` prints on stdout (a version string), if it runs.
pub fn first_line(program: impl AsRef<OsStr>, args: &[&str]) -> Option<String> {
    let o = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .map(String::from)
}

/// The last `max` bytes of a program's output, as text (for error messages).
pub fn tail(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

fn describe(cmd: &std::process::Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn checked(cmd: String, out: std::process::Output) -> Result<std::process::Output> {
    if out.status.success() {
        return Ok(out);
    }
    let mut stderr = tail(&out.stderr, 2000);
    if stderr.is_empty() {
        stderr = tail(&out.stdout, 2000);
    }
    Err(Error::command(cmd, out.status.to_string(), stderr))
}

/// Run a short program to completion (blocking, no stdin); a non-zero exit is `Error::Command`
/// with the tail of its stderr (or stdout).
pub fn run(cmd: &mut std::process::Command) -> Result<std::process::Output> {
    let desc = describe(cmd);
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| spawn_error(&desc, e))?;
    checked(desc, out)
}

/// The async twin of [`run`], for long programs (debootstrap, mkfs, qemu-img convert).
pub async fn run_async(cmd: &mut tokio::process::Command) -> Result<std::process::Output> {
    let desc = describe(cmd.as_std());
    let out = cmd
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| spawn_error(&desc, e))?;
    checked(desc, out)
}

/// `program args...`, fed `stdin` if given; its output whatever the exit status.
pub fn output(program: &str, args: &[&str], stdin: Option<&str>) -> Result<std::process::Output> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let desc = describe(&cmd);
    let mut child = cmd.spawn().map_err(|e| spawn_error(&desc, e))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        pipe.write_all(input.as_bytes()).map_err(|e| Error::Io {
            context: format!("writing to `{program}`"),
            source: e,
        })?;
    }
    child.wait_with_output().map_err(|e| Error::Io {
        context: format!("waiting for `{program}`"),
        source: e,
    })
}

/// [`output`], with a non-zero exit as `Error::Command`; its stdout.
pub fn stdout(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let out = output(program, args, stdin)?;
    let desc = format!("{program} {}", args.join(" "));
    let out = checked(desc, out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A program that could not be started: not installed is `Error::MissingTool` with its package.
fn spawn_error(desc: &str, e: std::io::Error) -> Error {
    let program = desc.split(' ').next().unwrap_or(desc);
    match e.kind() {
        std::io::ErrorKind::NotFound => missing(program),
        _ => Error::Io {
            context: format!("starting `{desc}`"),
            source: e,
        },
    }
}

/// The Debian package that provides `program`, for the fix line of `Error::MissingTool`.
fn package_for(program: &str) -> &'static str {
    match program.rsplit('/').next().unwrap_or(program) {
        "nft" => "nftables",
        "dnsmasq" => "dnsmasq-base",
        "qemu-img" => "qemu-utils",
        "genisoimage" => "genisoimage",
        "ssh" | "ssh-keygen" => "openssh-client",
        "debootstrap" => "debootstrap",
        "mkfs.ext4" => "e2fsprogs",
        _ => "the package that provides it",
    }
}

/// `Error::MissingTool` for `program`, naming its package.
pub fn missing(program: &str) -> Error {
    Error::missing_tool(
        program,
        format!(
            "install it: apt-get install {} (the integration_test role installs all of boma-qvm's tools)",
            package_for(program)
        ),
    )
}

/// Error unless every program is installed (checked before anything is built, so a missing
/// program never leaves something half-made behind).
pub fn require_all(programs: &[&str]) -> Result<()> {
    for p in programs {
        find(p).ok_or_else(|| missing(p))?;
    }
    Ok(())
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
        assert!(e.to_string().contains("not found on PATH"), "{e}");
    }

    fn exe(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn from_file(dir: &Path) -> (PathBuf, Option<PathBuf>) {
        (dir.to_path_buf(), Some("/etc/boma-qvm/config.env".into()))
    }

    /// Library callers that never ran config_file::apply (tests, other programs) still get the
    /// config file's value; the environment wins over it.
    #[test]
    fn the_setting_comes_from_the_environment_else_the_config_file() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("config.env");
        let var = "BOMA_QVM_ANSIBLE_DIR";
        std::fs::write(&file, format!("{var}=/from/file\n")).unwrap();
        assert_eq!(
            setting_in(var, None, &file),
            Some((PathBuf::from("/from/file"), Some(file.clone())))
        );
        assert_eq!(
            setting_in(var, Some("/from/env".into()), &file),
            Some((PathBuf::from("/from/env"), None))
        );
        assert_eq!(
            setting_in(var, Some("".into()), &d.path().join("none")),
            None
        );
    }

    #[test]
    fn the_setting_wins_over_path() {
        let set = tempfile::tempdir().unwrap();
        let on_path = tempfile::tempdir().unwrap();
        let want = exe(set.path(), "tool-x");
        exe(on_path.path(), "tool-x");
        let got = locate_with(
            "tool-x",
            Some(from_file(set.path())),
            "BOMA_QVM_X_DIR",
            on_path.path().as_os_str(),
            "",
        )
        .unwrap();
        assert_eq!(got.path, want);
        assert_eq!(
            got.origin.to_string(),
            format!(
                "BOMA_QVM_X_DIR={} (set in /etc/boma-qvm/config.env)",
                set.path().display()
            )
        );
    }

    #[test]
    fn without_the_setting_path_is_used_and_said() {
        let on_path = tempfile::tempdir().unwrap();
        let want = exe(on_path.path(), "tool-x");
        let got = locate_with(
            "tool-x",
            None,
            "BOMA_QVM_X_DIR",
            on_path.path().as_os_str(),
            "",
        )
        .unwrap();
        assert_eq!((got.path, got.origin), (want, Origin::Path));
    }

    #[test]
    fn a_stale_setting_is_an_error_naming_it_not_a_fall_back() {
        let set = tempfile::tempdir().unwrap();
        let on_path = tempfile::tempdir().unwrap();
        exe(on_path.path(), "tool-x");
        let e = locate_with(
            "tool-x",
            Some(from_file(set.path())),
            "BOMA_QVM_X_DIR",
            on_path.path().as_os_str(),
            "install it",
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 3);
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "`tool-x` was not found in BOMA_QVM_X_DIR={} (set in /etc/boma-qvm/config.env)",
                set.path().display()
            )),
            "{msg}"
        );
        assert!(
            msg.contains("fix BOMA_QVM_X_DIR in /etc/boma-qvm/config.env"),
            "{msg}"
        );
    }

    #[test]
    fn missing_everywhere_names_the_setting_in_problem_and_fix() {
        let empty = tempfile::tempdir().unwrap();
        let e = locate_with(
            "tool-x",
            None,
            "BOMA_QVM_X_DIR",
            empty.path().as_os_str(),
            "install it",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("`tool-x` was not found on PATH, and BOMA_QVM_X_DIR is not set"),
            "{msg}"
        );
        assert!(msg.contains("fix: set BOMA_QVM_X_DIR="), "{msg}");
        assert!(msg.ends_with("install it"), "{msg}");
    }

    #[test]
    fn a_missing_or_failing_program_says_so() {
        let e = stdout("boma-qvm-no-such-program", &[], None).unwrap_err();
        assert!(matches!(e, Error::MissingTool { .. }), "{e}");
        assert!(
            missing("nft")
                .to_string()
                .contains("apt-get install nftables")
        );
        assert!(missing("dnsmasq").to_string().contains("dnsmasq-base"));
        assert!(matches!(
            require_all(&["sh", "boma-qvm-no-such-program"]),
            Err(Error::MissingTool { .. })
        ));
        require_all(&["sh"]).unwrap();
        let e = stdout("sh", &["-c", "echo oops >&2; exit 3"], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("oops") && e.contains('3'), "{e}");
        assert_eq!(stdout("cat", &[], Some("hi")).unwrap(), "hi");
        let err = run(std::process::Command::new("sh").args(["-c", "echo boom >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sh -c") && err.contains("boom"), "{err}");
    }
}
