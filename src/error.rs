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
    #[error("resource guard: {0}")]
    Guard(String),

    /// QEMU could not be started or died.
    #[error("QEMU: {problem}\n  fix: {fix}")]
    Qemu { problem: String, fix: String },

    /// The QMP control channel failed (socket absent, no answer, command refused).
    #[error("QMP: {0}")]
    Qmp(String),

    /// A wait ran out of time. `detail` usually carries the console tail.
    #[error("timed out after {secs}s waiting for {what}{detail}")]
    Timeout {
        what: String,
        secs: u64,
        detail: String,
    },

    /// The guest showed a known failure on its console (kernel panic, emergency mode, ...).
    #[error("guest failure seen on the console: {pattern}\n{detail}")]
    GuestFailure { pattern: String, detail: String },

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
    #[error("verify failed: {0}")]
    VerifyFailed(String),

    /// An external command failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
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
            Error::Guard(_) => 6,
            Error::Qemu { .. } => 7,
            Error::Qmp(_) => 8,
            Error::Timeout { .. } => 9,
            Error::GuestFailure { .. } => 10,
            Error::Network { .. } => 11,
            Error::Image { .. } => 12,
            Error::Ansible { .. } => 13,
            Error::VerifyFailed(_) => 14,
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

    pub fn timeout(what: impl Into<String>, secs: u64, detail: impl Into<String>) -> Self {
        Error::Timeout {
            what: what.into(),
            secs,
            detail: detail.into(),
        }
    }
}

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
