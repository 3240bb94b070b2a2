//! The library's error type. Every variant names the problem and, where there is one, the fix;
//! every variant maps to a distinct process exit code (see `Error::exit_code` and the README).

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input from the user: a flag, a name, a file that does not parse.
    #[error("{problem}\n  fix: {fix}")]
    Input { problem: String, fix: String },

    /// A required external program is not installed (or not where a setting says it is).
    /// `looked_in` says where it was looked for: "on PATH", or the setting that names a directory.
    #[error("`{program}` was not found {looked_in}\n  fix: {fix}")]
    MissingTool {
        program: String,
        looked_in: String,
        fix: String,
    },

    /// Something the user named does not exist (a VM, an image, a file).
    #[error("{what} does not exist\n  fix: {fix}")]
    NotFound { what: String, fix: String },

    /// Something exists that must not (a VM of that name, a second VM under the one-at-a-time lock).
    #[error("{what} already exists\n  fix: {fix}")]
    AlreadyExists { what: String, fix: String },

    /// The resource guard refused to start a VM.
    #[error("resource guard: {problem}\n  fix: {fix}")]
    Guard { problem: String, fix: String },

    /// QEMU could not be started or died.
    #[error("QEMU: {problem}\n  fix: {fix}")]
    Qemu { problem: String, fix: String },

    /// The QMP control channel (or the guest agent's) failed: socket absent, no answer, refused.
    #[error("QMP: {problem}\n  fix: {fix}")]
    Qmp { problem: String, fix: String },

    /// A wait ran out of time.
    #[error("timed out after {secs}s waiting for {what}\n  fix: {fix}")]
    Timeout {
        what: String,
        secs: u64,
        fix: String,
    },

    /// The guest showed a known failure on its console (kernel panic, emergency mode, ...), or
    /// QEMU reported it panicked (GUEST_PANICKED).
    #[error("guest failure: {pattern}\n  {detail}\n  fix: {fix}")]
    GuestFailure {
        pattern: String,
        detail: String,
        fix: String,
    },

    /// A reboot that could not be proven: the guest did not go down, or came back with the
    /// same boot_id.
    #[error("reboot: {problem}\n  fix: {fix}")]
    Reboot { problem: String, fix: String },

    /// The isolated network could not be built or torn down.
    #[error("network: {problem}\n  fix: {fix}")]
    Network { problem: String, fix: String },

    /// Golden image download, checksum, build or import failed.
    #[error("image: {problem}\n  fix: {fix}")]
    Image { problem: String, fix: String },

    /// ansible-playbook / ansible-inventory failed or a safety invariant refused the run.
    #[error("ansible: {problem}\n  fix: {fix}")]
    Ansible { problem: String, fix: String },

    /// The verify playbook failed: the harness caught something (the point of the tool).
    #[error("verify failed: {problem}\n  fix: {fix}")]
    VerifyFailed { problem: String, fix: String },

    /// SSH is gone while the guest is alive (after a reboot or an apply): the change under test
    /// locked access out. Called with the evidence: the boot-done signal, how SSH fails, the agent.
    #[error("lockout: {problem}\n  fix: {fix}")]
    Lockout { problem: String, fix: String },

    /// An external command failed.
    #[error("`{cmd}` failed ({status}): {stderr}\n  fix: {fix}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
        fix: String,
    },

    #[error(
        "{context}: {source}\n  fix: check that the path exists, is this user's to use, and the disk has room"
    )]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// Any of the above as the outcome of a `cycle`, which exits with its class's code.
    #[error("{inner}")]
    Classified {
        inner: Box<Error>,
        class: FailureClass,
    },

    /// Any of the above, with the evidence that explains it (a console tail, a log's path).
    /// Attached once, by [`Error::with_evidence`].
    #[error("{inner}\n--- {title} ---\n{text}")]
    Evidence {
        inner: Box<Error>,
        title: String,
        text: String,
    },
}

impl Error {
    /// Distinct exit codes, documented in the README. 1 is reserved for I/O and unexpected errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Io { .. } | Error::Command { .. } => 1,
            Error::Input { .. } => 2,
            Error::MissingTool { .. } => 3,
            Error::NotFound { .. } => 4,
            Error::AlreadyExists { .. } => 5,
            Error::Guard { .. } => 6,
            Error::Qemu { .. } => 7,
            Error::Qmp { .. } => 8,
            Error::Timeout { .. } => 9,
            Error::GuestFailure { .. } => 10,
            Error::Network { .. } => 11,
            Error::Image { .. } => 12,
            Error::Ansible { .. } => 13,
            Error::VerifyFailed { .. } => 14,
            Error::Reboot { .. } => 15,
            Error::Lockout { .. } => 16,
            Error::Classified { inner, class } => class.exit_code(inner.exit_code()),
            Error::Evidence { inner, .. } => inner.exit_code(),
        }
    }

    /// The error itself, without attached evidence.
    pub fn inner(&self) -> &Error {
        match self {
            Error::Evidence { inner, .. } | Error::Classified { inner, .. } => inner.inner(),
            other => other,
        }
    }

    /// True when evidence is attached already.
    pub fn has_evidence(&self) -> bool {
        match self {
            Error::Evidence { .. } => true,
            Error::Classified { inner, .. } => inner.has_evidence(),
            _ => false,
        }
    }

    /// The failure class of this error on its own (a `cycle` refines it by the stage it failed
    /// in; see `cycle::classify`).
    pub fn class(&self) -> FailureClass {
        match self.inner() {
            Error::Lockout { .. } => FailureClass::Lockout,
            Error::VerifyFailed { .. } | Error::Ansible { .. } => FailureClass::Test,
            Error::Qemu { .. }
            | Error::Qmp { .. }
            | Error::Timeout { .. }
            | Error::GuestFailure { .. }
            | Error::Reboot { .. }
            | Error::Network { .. }
            | Error::Image { .. }
            | Error::Command { .. } => FailureClass::Infrastructure,
            Error::Input { .. }
            | Error::MissingTool { .. }
            | Error::NotFound { .. }
            | Error::AlreadyExists { .. }
            | Error::Guard { .. }
            | Error::Io { .. } => FailureClass::Input,
            Error::Evidence { .. } | Error::Classified { .. } => {
                unreachable!("inner() sees through")
            }
        }
    }

    /// This error as a `cycle`'s outcome of class `class` (its exit code is the class's).
    pub fn classified(self, class: FailureClass) -> Self {
        match self {
            Error::Classified { inner, .. } => Error::Classified { inner, class },
            e => Error::Classified {
                inner: Box::new(e),
                class,
            },
        }
    }

    /// Attach evidence (`title`: what it is, e.g. "console tail (/run/.../console.log)").
    /// The first evidence attached wins: the closest witness explains best.
    pub fn with_evidence(self, title: impl Into<String>, text: impl Into<String>) -> Self {
        if self.has_evidence() {
            return self;
        }
        Error::Evidence {
            inner: Box::new(self),
            title: title.into(),
            text: text.into(),
        }
    }

    /// Replace the fix line (of any variant that has one).
    pub fn with_fix(mut self, new: impl Into<String>) -> Self {
        match &mut self {
            Error::Input { fix, .. }
            | Error::MissingTool { fix, .. }
            | Error::NotFound { fix, .. }
            | Error::AlreadyExists { fix, .. }
            | Error::Guard { fix, .. }
            | Error::Qemu { fix, .. }
            | Error::Qmp { fix, .. }
            | Error::Timeout { fix, .. }
            | Error::GuestFailure { fix, .. }
            | Error::Reboot { fix, .. }
            | Error::Network { fix, .. }
            | Error::Image { fix, .. }
            | Error::Ansible { fix, .. }
            | Error::VerifyFailed { fix, .. }
            | Error::Lockout { fix, .. }
            | Error::Command { fix, .. } => *fix = new.into(),
            Error::Evidence { inner, .. } | Error::Classified { inner, .. } => {
                let i = std::mem::replace(inner.as_mut(), Error::input("", ""));
                **inner = i.with_fix(new);
            }
            Error::Io { .. } => {}
        }
        self
    }

    /// The same error with every text in it passed through `f` (e.g. a secret scrubbed out of a
    /// console tail or a playbook's failure message); the variant, and so the exit code, stays.
    pub fn map_text(self, f: &dyn Fn(&str) -> String) -> Self {
        use Error::*;
        match self {
            Input { problem, fix } => Input {
                problem: f(&problem),
                fix: f(&fix),
            },
            MissingTool {
                program,
                looked_in,
                fix,
            } => MissingTool {
                program: f(&program),
                looked_in: f(&looked_in),
                fix: f(&fix),
            },
            NotFound { what, fix } => NotFound {
                what: f(&what),
                fix: f(&fix),
            },
            AlreadyExists { what, fix } => AlreadyExists {
                what: f(&what),
                fix: f(&fix),
            },
            Guard { problem, fix } => Guard {
                problem: f(&problem),
                fix: f(&fix),
            },
            Qemu { problem, fix } => Qemu {
                problem: f(&problem),
                fix: f(&fix),
            },
            Qmp { problem, fix } => Qmp {
                problem: f(&problem),
                fix: f(&fix),
            },
            Timeout { what, secs, fix } => Timeout {
                what: f(&what),
                secs,
                fix: f(&fix),
            },
            GuestFailure {
                pattern,
                detail,
                fix,
            } => GuestFailure {
                pattern: f(&pattern),
                detail: f(&detail),
                fix: f(&fix),
            },
            Reboot { problem, fix } => Reboot {
                problem: f(&problem),
                fix: f(&fix),
            },
            Network { problem, fix } => Network {
                problem: f(&problem),
                fix: f(&fix),
            },
            Image { problem, fix } => Image {
                problem: f(&problem),
                fix: f(&fix),
            },
            Ansible { problem, fix } => Ansible {
                problem: f(&problem),
                fix: f(&fix),
            },
            VerifyFailed { problem, fix } => VerifyFailed {
                problem: f(&problem),
                fix: f(&fix),
            },
            Lockout { problem, fix } => Lockout {
                problem: f(&problem),
                fix: f(&fix),
            },
            Classified { inner, class } => Classified {
                inner: Box::new(inner.map_text(f)),
                class,
            },
            Command {
                cmd,
                status,
                stderr,
                fix,
            } => Command {
                cmd: f(&cmd),
                status: f(&status),
                stderr: f(&stderr),
                fix: f(&fix),
            },
            Io { context, source } => {
                let msg = source.to_string();
                let scrubbed = f(&msg);
                Io {
                    context: f(&context),
                    source: if scrubbed == msg {
                        source
                    } else {
                        std::io::Error::new(source.kind(), scrubbed)
                    },
                }
            }
            Evidence { inner, title, text } => Evidence {
                inner: Box::new(inner.map_text(f)),
                title: f(&title),
                text: f(&text),
            },
        }
    }

    pub fn input(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Input {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// A program that was looked for on PATH and is not there.
    pub fn missing_tool(program: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::MissingTool {
            program: program.into(),
            looked_in: "on PATH".into(),
            fix: fix.into(),
        }
    }

    pub fn not_found(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::NotFound {
            what: what.into(),
            fix: fix.into(),
        }
    }

    pub fn qemu(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Qemu {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub fn qmp(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Qmp {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub fn guard(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Guard {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub fn network(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Network {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub fn image(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Image {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub fn ansible(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Ansible {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub fn verify_failed(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::VerifyFailed {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// A wait that ran out; `detail` is appended to what was awaited (e.g. the last attempt's
    /// error). The fix says where to look; `with_fix` gives a better one where there is one.
    pub fn timeout(what: impl Into<String>, secs: u64, detail: impl Into<String>) -> Self {
        Error::Timeout {
            what: format!("{}{}", what.into(), detail.into()),
            secs,
            fix: "look at the VM's console (`boma-qvm console VM --log`) and events.jsonl; \
                  under TCG everything is several times slower than under KVM"
                .into(),
        }
    }

    /// A command that exited non-zero: its own message says why.
    pub fn command(
        cmd: impl Into<String>,
        status: impl Into<String>,
        stderr: impl Into<String>,
    ) -> Self {
        Error::Command {
            cmd: cmd.into(),
            status: status.into(),
            stderr: stderr.into(),
            fix: COMMAND_FIX.into(),
        }
    }
}

/// An error as it crosses the netd socket: its exit code, problem and fix (evidence folded
/// into the problem). `Error::from(WireError)` rebuilds the variant the code stands for, so a
/// refusal from the privileged side reads (and exits) exactly as the same refusal made locally.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireError {
    pub code: i32,
    pub problem: String,
    pub fix: String,
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> WireError {
        let code = e.exit_code();
        let text = e.to_string();
        let (problem, fix) = match e.inner() {
            Error::Input { problem, fix }
            | Error::Guard { problem, fix }
            | Error::Qemu { problem, fix }
            | Error::Qmp { problem, fix }
            | Error::Reboot { problem, fix }
            | Error::Network { problem, fix }
            | Error::Image { problem, fix }
            | Error::Ansible { problem, fix }
            | Error::VerifyFailed { problem, fix }
            | Error::Lockout { problem, fix } => (problem.clone(), fix.clone()),
            Error::NotFound { what, fix } | Error::AlreadyExists { what, fix } => {
                (what.clone(), fix.clone())
            }
            other => match other.to_string().split_once("\n  fix: ") {
                Some((p, f)) => (p.to_string(), f.to_string()),
                None => (text.clone(), COMMAND_FIX.to_string()),
            },
        };
        let problem = match e {
            Error::Evidence { title, text, .. } => format!("{problem}\n--- {title} ---\n{text}"),
            _ => problem,
        };
        WireError { code, problem, fix }
    }
}

impl From<WireError> for Error {
    fn from(w: WireError) -> Error {
        let WireError { code, problem, fix } = w;
        match code {
            2 => Error::Input { problem, fix },
            4 => Error::NotFound { what: problem, fix },
            5 => Error::AlreadyExists { what: problem, fix },
            6 => Error::Guard { problem, fix },
            7 => Error::Qemu { problem, fix },
            8 => Error::Qmp { problem, fix },
            12 => Error::Image { problem, fix },
            13 => Error::Ansible { problem, fix },
            14 => Error::VerifyFailed { problem, fix },
            15 => Error::Reboot { problem, fix },
            16 => Error::Lockout { problem, fix },
            3 => Error::MissingTool {
                program: problem,
                looked_in: "on the netd side".into(),
                fix,
            },
            1 => Error::Command {
                cmd: "boma-qvm netd".into(),
                status: "failed".into(),
                stderr: problem,
                fix,
            },
            _ => Error::Network { problem, fix },
        }
    }
}

/// Whose fault a failed `cycle` is, at a glance: the report says it and the exit code is the
/// class's (README, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureClass {
    /// The harness or the machine: QEMU crashed, the guest panicked, no lease, the first SSH
    /// never came, the image could not be built. Retry, or fix the machine.
    Infrastructure,
    /// SSH gone while the guest is alive, after the reboot or the apply: the change locked
    /// access out.
    Lockout,
    /// The change under test: the apply failed, or verify did.
    Test,
    /// The input or the tool: a bad flag or file, a missing program, a safety stop.
    Input,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Infrastructure => "infrastructure",
            FailureClass::Lockout => "lockout",
            FailureClass::Test => "test failure",
            FailureClass::Input => "input/tool error",
        }
    }

    /// A `cycle`'s exit code: 14 test failure (as verify's always was), 16 lockout, 20
    /// infrastructure; an input or tool error keeps its own kind's code (1-6, 13 for a safety
    /// stop), as documented before classes existed.
    pub fn exit_code(self, kind_code: i32) -> i32 {
        match self {
            FailureClass::Test => 14,
            FailureClass::Lockout => 16,
            FailureClass::Infrastructure => 20,
            FailureClass::Input => kind_code,
        }
    }

    /// What to do about it, in one line.
    pub fn meaning(self) -> &'static str {
        match self {
            FailureClass::Infrastructure => {
                "the harness or this machine failed, not the change: run it again; if it repeats, \
                 read console.log and `boma-qvm doctor`"
            }
            FailureClass::Lockout => {
                "the change locked SSH out while the guest runs: the incident signature"
            }
            FailureClass::Test => "the change under test failed (apply or verify): fix the change",
            FailureClass::Input => {
                "the input or the tool: fix the command, the repo or the machine"
            }
        }
    }
}

/// The fix of a failed external command: its own message says why.
pub const COMMAND_FIX: &str = "read the command's own message above; run it by hand to see more";

/// Attach a context sentence to an `io::Error` (`.ctx("reading /x")`).
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

/// `path.display()` for messages, as an owned string.
pub fn show(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_the_wire_with_their_code_problem_and_fix() {
        for e in [
            Error::network("bridge x is foreign", "pick another"),
            Error::not_found("VM boma-it-a", "list them"),
            Error::input("bad", "good"),
            Error::AlreadyExists {
                what: "VM b".into(),
                fix: "down it".into(),
            },
        ] {
            let w = WireError::from(&e);
            let json = serde_json::to_string(&w).unwrap();
            let back: Error = serde_json::from_str::<WireError>(&json).unwrap().into();
            assert_eq!(back.exit_code(), e.exit_code());
            assert_eq!(back.to_string(), e.to_string());
        }
        let w = WireError::from(&Error::command("nft -f -", "exit 1", "no"));
        assert_eq!(Error::from(w).exit_code(), 1);
    }

    #[test]
    fn every_kind_prints_a_fix_and_evidence_comes_once_after_it() {
        let io = Error::Io {
            context: "reading /x".into(),
            source: std::io::Error::other("boom"),
        };
        for e in [
            Error::timeout("x", 3, ""),
            Error::command("ls", "exit 2", "no"),
            Error::guard("no RAM", "free some"),
            io,
        ] {
            assert!(e.to_string().contains("\n  fix: "), "{e}");
        }
        let e = Error::timeout("SSH", 5, "")
            .with_evidence("console tail", "login:")
            .with_evidence("second", "ignored");
        let text = e.to_string();
        assert!(text.ends_with("--- console tail ---\nlogin:"), "{text}");
        assert!(!text.contains("second"));
        assert_eq!(e.exit_code(), 9);
        assert!(matches!(e.inner(), Error::Timeout { .. }));
        let e = e.with_fix("press reset");
        assert!(e.to_string().contains("fix: press reset"), "{e}");
    }
}
