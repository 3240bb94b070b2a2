//! A VM's run directory (Lima's per-instance directory): every file boma-qvm keeps for one VM.

use crate::error::IoContext;
use crate::machine::spec::VmSpec;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RunDir { dir: dir.into() }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn spec(&self) -> PathBuf {
        self.file("spec.json")
    }
    pub fn supervisor_pid(&self) -> PathBuf {
        self.file("supervisor.pid")
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.file("supervisor.log")
    }
    pub fn qemu_pid(&self) -> PathBuf {
        self.file("qemu.pid")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.file("qemu.log")
    }
    /// The supervisor's QMP monitor: it records every event for the VM's whole life.
    pub fn qmp_sock(&self) -> PathBuf {
        self.file("qmp.sock")
    }
    /// A second QMP monitor for commands from CLI invocations and tests.
    pub fn ctl_sock(&self) -> PathBuf {
        self.file("ctl.sock")
    }
    /// The QEMU guest agent's channel (virtio-serial): a way in without network or SSH. The
    /// supervisor serves it, relaying to `qga_qemu_sock`.
    pub fn qga_sock(&self) -> PathBuf {
        self.file("qga.sock")
    }
    /// QEMU's own end of the agent channel, held open by the supervisor (see `qga::relay`).
    pub fn qga_qemu_sock(&self) -> PathBuf {
        self.file("qga-qemu.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.file("console.log")
    }
    /// Holds the path of the serial console's pty (`/dev/pts/N`) while the VM runs.
    pub fn console_pty(&self) -> PathBuf {
        self.file("console.pty")
    }
    pub fn events(&self) -> PathBuf {
        self.file("events.jsonl")
    }
    pub fn overlay(&self) -> PathBuf {
        self.file("disk.qcow2")
    }
    pub fn seed(&self) -> PathBuf {
        self.file("seed.iso")
    }
    pub fn ssh_key(&self) -> PathBuf {
        self.file("id_ed25519")
    }
    /// Where QEMU sends its state when it is saved (`state::save`): boma-qvm listens on it.
    pub fn migrate_sock(&self) -> PathBuf {
        self.file(crate::machine::state::MIGRATE_SOCK)
    }
    /// One-shot: the saved state the next start restores instead of booting (a warm start). The
    /// supervisor reads and removes it, so a later start boots as usual.
    pub fn restore_request(&self) -> PathBuf {
        self.file("restore-from")
    }

    /// The VM's name: its run directory's name.
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn read_spec(&self) -> Result<VmSpec> {
        let name = self.name();
        let remove = format!(
            "remove it with `boma-qvm down {name}` (or `boma-qvm prune`) and create it again"
        );
        let text = match std::fs::read_to_string(self.spec()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::input(
                    format!(
                        "VM {name} is broken: its run directory {} has no spec.json (it was \
                         half-made, or something deleted the file)",
                        self.dir.display()
                    ),
                    remove,
                ));
            }
            Err(e) => {
                return Err(e).ctx(|| format!("reading {}", self.spec().display()));
            }
        };
        serde_json::from_str(&text).map_err(|e| {
            Error::input(
                format!(
                    "VM {name} is broken: {} is not a valid VM spec: {e}",
                    self.spec().display()
                ),
                remove,
            )
        })
    }

    pub fn write_spec(&self, spec: &VmSpec) -> Result<()> {
        let text = serde_json::to_string_pretty(spec).expect("spec serialises");
        crate::paths::write_atomic(&self.spec(), text.as_bytes())
    }

    /// Refuse a run dir whose socket paths would not fit in a unix socket address.
    pub fn check_socket_paths(&self) -> Result<()> {
        let longest = [self.ctl_sock(), self.qmp_sock(), self.qga_qemu_sock()]
            .iter()
            .map(|p| p.as_os_str().len())
            .max()
            .unwrap_or(0);
        if longest > MAX_SOCKET_PATH {
            return Err(Error::input(
                format!(
                    "the run directory {} is too deep for unix sockets ({longest} > {MAX_SOCKET_PATH} bytes)",
                    self.dir.display()
                ),
                "point BOMA_QVM_STATE_DIR at a shorter path",
            ));
        }
        Ok(())
    }

    pub fn read_pid(path: &Path) -> Option<i32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }
}

/// Make `dir` (its parents as usual) readable, writable and searchable by this user only (0700,
/// whatever the umask): a run directory holds the VM's SSH key, its QMP sockets (full control of
/// the VM) and its logs, so no other user may read it or create anything in it.
pub fn create_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        // An existing one is reused only when it is a real directory (not a link to elsewhere).
        Err(e)
            if e.kind() == std::io::ErrorKind::AlreadyExists
                && std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) => {}
        Err(e) => return Err(e).ctx(|| format!("creating {}", dir.display())),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .ctx(|| format!("chmod 0700 {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_are_private_to_their_user() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("vms/boma-it-x");
        create_private(&d).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        create_private(&d).unwrap();
        assert_eq!(mode(&d), 0o700, "an existing one is made private again");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(create_private(&link).is_err(), "a symlink is not a run dir");
    }

    #[test]
    fn deep_dirs_are_refused_for_sockets() {
        assert!(RunDir::new("/tmp/x").check_socket_paths().is_ok());
        let deep = RunDir::new(format!("/tmp/{}", "d".repeat(120)));
        assert_eq!(deep.check_socket_paths().unwrap_err().exit_code(), 2);
    }
}
