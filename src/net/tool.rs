//! Running the external tools of the network layer (`nft`, `dnsmasq`), with a clear error when
//! one is not installed.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::{Error, Result};

/// The Debian package that provides `program`, for the fix line of `Error::MissingTool`.
fn package_for(program: &str) -> &'static str {
    match program {
        "nft" => "nftables",
        "dnsmasq" => "dnsmasq-base",
        _ => "the package that provides it",
    }
}

/// `Error::MissingTool` for `program`.
pub fn missing(program: &str) -> Error {
    Error::missing_tool(
        program,
        format!("install it: apt-get install {}", package_for(program)),
    )
}

/// Error unless every program is on PATH (checked before anything is built, so a missing tool
/// never leaves a half-built network behind).
pub fn require(programs: &[&str]) -> Result<()> {
    for p in programs {
        crate::tools::find(p).ok_or_else(|| missing(p))?;
    }
    Ok(())
}

/// Run `program args...` (feeding `stdin` if given) and return its output, mapping "not found"
/// to `Error::MissingTool`. Does not check the exit status.
pub fn output(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => missing(program),
        _ => Error::Io {
            context: format!("starting `{program}`"),
            source: e,
        },
    })?;
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

/// Like `output`, but a non-zero exit becomes `Error::Command`; returns stdout.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let out = output(program, args, stdin)?;
    if !out.status.success() {
        return Err(Error::Command {
            fix: crate::error::COMMAND_FIX.into(),
            cmd: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_program_is_a_missing_tool_error() {
        let e = run("boma-qvm-no-such-program", &[], None).unwrap_err();
        assert!(matches!(e, Error::MissingTool { .. }), "{e}");
        assert!(
            missing("nft")
                .to_string()
                .contains("apt-get install nftables")
        );
        assert!(missing("dnsmasq").to_string().contains("dnsmasq-base"));
        assert!(matches!(
            require(&["sh", "boma-qvm-no-such-program"]),
            Err(Error::MissingTool { .. })
        ));
        require(&["sh"]).unwrap();
    }

    #[test]
    fn failing_program_reports_stderr() {
        let e = run("sh", &["-c", "echo oops >&2; exit 3"], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("oops") && e.contains('3'), "{e}");
        assert_eq!(run("cat", &[], Some("hi")).unwrap(), "hi");
    }
}
