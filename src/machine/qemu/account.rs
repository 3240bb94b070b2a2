//! Who QEMU runs as. Never root: it runs as the user who started the VM, and when that is root
//! the supervisor drops QEMU to a dedicated unprivileged account (`boma-qvm-qemu`, with a group
//! of its own, made by the `integration_test` role; `BOMA_QVM_QEMU_USER` names another) before
//! exec. Its group is not `boma-qvm`, the operators' group (netd's socket): operators get no
//! way into root's run directories.
//!
//! QEMU always runs inside its run directory (its cwd) and is given the run directory's files
//! by relative name, so the account needs no way through the directories above it (root's
//! state dir is under /root). What lies outside the run directory the supervisor opens and
//! hands over as fds: the golden image behind the overlay (an fdset: QEMU opens nothing), a
//! kernel and initrd (reopened through /proc/self/fd: only the file's own mode counts, which
//! is checked before QEMU starts, with the fix).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};

use crate::error::IoContext;
use crate::machine::rundir::RunDir;
use crate::{Error, Result, error::show};

/// The setting naming the account QEMU runs as when root starts a VM.
pub const ACCOUNT_VAR: &str = "BOMA_QVM_QEMU_USER";
/// Its default (the role creates it: a system user without a shell, in group kvm).
pub const DEFAULT_ACCOUNT: &str = "boma-qvm-qemu";

/// An unprivileged account QEMU is dropped to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups: the account's primary group and `kvm` (for /dev/kvm) if it exists.
    pub groups: Vec<Gid>,
}

/// The account's name from the environment (or the default).
pub fn account_name() -> String {
    std::env::var(ACCOUNT_VAR)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_ACCOUNT.to_string())
}

/// The account QEMU must be dropped to: `None` when this process is not root (QEMU then runs
/// as this user); for root, the dedicated account, or an error saying how to create it.
pub fn for_this_process() -> Result<Option<Account>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    lookup(&account_name()).map(Some)
}

/// Look up `name`; refuses a missing account and root itself.
pub fn lookup(name: &str) -> Result<Account> {
    let fix = format!(
        "create it (the integration_test role does: `make setup`), e.g. `useradd --system \
         --no-create-home --shell /usr/sbin/nologin --groups kvm {name}`; or run boma-qvm as an \
         unprivileged user; or name another account in {ACCOUNT_VAR}"
    );
    let user = User::from_name(name)
        .ok()
        .flatten()
        .ok_or_else(|| {
            Error::qemu(
                format!(
                    "QEMU never runs as root, and the account it is dropped to when root starts a VM, `{name}`, does not exist"
                ),
                fix.clone(),
            )
        })?;
    if user.uid.is_root() || user.gid.as_raw() == 0 {
        return Err(Error::input(
            format!(
                "{ACCOUNT_VAR}={name} is root (uid {}, gid {}): QEMU must never run as root",
                user.uid, user.gid
            ),
            format!(
                "name an unprivileged account in {ACCOUNT_VAR}, or unset it for `{DEFAULT_ACCOUNT}`"
            ),
        ));
    }
    let mut groups = vec![user.gid];
    if let Some(kvm) = Group::from_name("kvm").ok().flatten()
        && kvm.gid != user.gid
    {
        groups.push(kvm.gid);
    }
    Ok(Account {
        name: user.name,
        uid: user.uid,
        gid: user.gid,
        groups,
    })
}

/// Make the run directory usable by `acct` and nothing more: the directory becomes group
/// `acct` with mode 1770 (sticky: QEMU can make its sockets and console log, and cannot remove
/// or rename root's files, the SSH key among them, which stay 0600 root); the overlay becomes
/// the account's, mode 0600 (QEMU writes it; nobody else reads the guest's disk), the seed
/// readable by its group.
pub fn prepare_run_dir(run: &RunDir, acct: &Account, files: &[(PathBuf, bool)]) -> Result<()> {
    chown(&run.dir, None, Some(acct.gid))?;
    std::fs::set_permissions(&run.dir, std::fs::Permissions::from_mode(0o1770))
        .ctx(|| format!("setting the mode of {}", show(&run.dir)))?;
    for (path, writable) in files {
        if !path.exists() {
            continue;
        }
        if *writable {
            chown(path, Some(acct.uid), Some(acct.gid))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .ctx(|| format!("setting the mode of {}", show(path)))?;
        } else {
            chown(path, None, Some(acct.gid))?;
            let mode = std::fs::metadata(path)
                .ctx(|| format!("reading {}", show(path)))?
                .permissions()
                .mode();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o040))
                .ctx(|| format!("setting the mode of {}", show(path)))?;
        }
    }
    Ok(())
}

fn chown(path: &Path, uid: Option<Uid>, gid: Option<Gid>) -> Result<()> {
    nix::unistd::chown(path, uid, gid).map_err(|e| Error::Io {
        context: format!("chown {}", show(path)),
        source: e.into(),
    })
}

/// Why `acct` cannot read the file `path` when QEMU reopens it through /proc/self/fd (only
/// the file's own mode counts there, not the directories above it), or `None` when it can.
/// Mode bits only (owner, group, other); ACLs are not consulted.
pub fn unreadable_by(acct: &Account, path: &Path) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Err(e) => return Some(format!("{}: {e}", show(path))),
        Ok(m) => m,
    };
    let mode = meta.mode();
    let readable = if meta.uid() == acct.uid.as_raw() {
        mode & 0o400 != 0
    } else if acct.groups.iter().any(|g| g.as_raw() == meta.gid()) {
        mode & 0o040 != 0
    } else {
        mode & 0o004 != 0
    };
    (!readable).then(|| {
        format!(
            "it cannot read {} (mode {:o}, owner uid {}, group gid {})",
            show(path),
            mode & 0o7777,
            meta.uid(),
            meta.gid()
        )
    })
}

/// Refuse before QEMU starts when `acct` cannot read one of `paths` (a kernel or initrd QEMU
/// reopens), naming the file and the fix.
pub fn check_readable(acct: &Account, paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        if let Some(why) = unreadable_by(acct, p) {
            return Err(Error::qemu(
                format!(
                    "QEMU runs as `{}` (root never runs QEMU), and {why}",
                    acct.name
                ),
                format!(
                    "make the file readable by others or by group {} (`chmod o+r`; kernels and \
                     initrds hold no secrets), or run boma-qvm as an unprivileged user",
                    acct.name
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nobody() -> Account {
        Account {
            name: "nobody".into(),
            uid: Uid::from_raw(65534),
            gid: Gid::from_raw(65534),
            groups: vec![Gid::from_raw(65534)],
        }
    }

    #[test]
    fn only_the_files_own_mode_counts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("private");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let file = dir.join("vmlinuz");
        std::fs::write(&file, "k").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            unreadable_by(&nobody(), &file),
            None,
            "a private directory above does not matter: QEMU reopens the fd"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let why = unreadable_by(&nobody(), &file).unwrap();
        assert!(
            why.contains("cannot read") && why.contains("mode 600"),
            "{why}"
        );
        let e = check_readable(&nobody(), &[file]).unwrap_err().to_string();
        assert!(
            e.contains("QEMU runs as `nobody`") && e.contains("fix:") && e.contains("chmod o+r"),
            "{e}"
        );
    }

    #[test]
    fn root_is_never_the_account() {
        let e = lookup("root").unwrap_err().to_string();
        assert!(e.contains("must never run as root"), "{e}");
        let e = lookup("no-such-boma-account").unwrap_err().to_string();
        assert!(
            e.contains("does not exist") && e.contains("useradd --system"),
            "{e}"
        );
    }
}
