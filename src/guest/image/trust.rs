//! Who may have written what the cache holds, checked before boma-qvm acts on it.
//!
//! Root runs image commands (build, pull, import, rm, prune) and boots what the cache holds, so
//! nothing in the cache may be writable, or replaceable, by another user: an entry another user
//! made (a `.tmp-x` symlink to `/`, a swapped golden image, a `logs/` link into `/etc`) would
//! otherwise be acted on with root's rights. The rule, for every directory boma-qvm acts in
//! under the cache and for every file it uses:
//!
//! - it belongs to root or to this user (the cache's owner when the cache is this user's own);
//! - it is not writable by group or others; each directory above it is either not writable by
//!   group or others, or sticky (`/tmp`), so no one else can rename an entry on the way to it.
//!
//! The shared cache the integration_test role makes is `root:kvm 2750`: group members read golden
//! images, only root adds them.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result, show};

/// Whether `uid` may own what this user acts on: root, or this user.
pub fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

fn owner_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("{} (uid {uid})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// Why the file or directory `meta` describes cannot be trusted as the end of a path (`leaf`) or
/// as a directory on the way to one, or `None`.
fn problem(meta: &std::fs::Metadata, leaf: bool) -> Option<String> {
    if !trusted_owner(meta.uid()) {
        return Some(format!(
            "belongs to {}, not to root or to this user",
            owner_name(meta.uid())
        ));
    }
    let mode = meta.mode();
    let sticky = meta.is_dir() && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && (leaf || !sticky) {
        return Some(format!(
            "is writable by {} (mode {:o})",
            if mode & 0o002 != 0 {
                "every user"
            } else {
                "its group"
            },
            mode & 0o7777
        ));
    }
    None
}

/// Every directory from `/` down to `path`'s parent, as written.
fn ancestors(path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = path.ancestors().skip(1).map(Path::to_path_buf).collect();
    out.retain(|p| !p.as_os_str().is_empty());
    out.reverse();
    out
}

/// The first untrusted step on the way to `path` (its directories as written, then as resolved
/// when a symlink is on the way), with why. `path` itself is checked as a leaf.
pub fn untrusted(path: &Path) -> Option<(PathBuf, String)> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    if abs.components().any(|c| c == Component::ParentDir) {
        return Some((abs, "contains `..`".into()));
    }
    let mut steps = ancestors(&abs);
    if let Ok(real) = std::fs::canonicalize(&abs)
        && real != abs
    {
        steps.extend(ancestors(&real));
    }
    for dir in steps {
        match std::fs::metadata(&dir) {
            Ok(m) => {
                if let Some(why) = problem(&m, false) {
                    return Some((dir, why));
                }
            }
            Err(e) => return Some((dir, format!("cannot be checked: {e}"))),
        }
    }
    match std::fs::symlink_metadata(&abs) {
        Ok(m) if m.file_type().is_symlink() => Some((abs, "is a symlink".into())),
        Ok(m) => problem(&m, true).map(|why| (abs, why)),
        Err(e) => Some((abs, format!("cannot be checked: {e}"))),
    }
}

/// Refuse to act on `path` (a directory of the cache, or a file in it) unless only root or this
/// user can have written it. `what` names it for the message.
pub fn check(path: &Path, what: &str) -> Result<()> {
    let Some((at, why)) = untrusted(path) else {
        return Ok(());
    };
    let fix = if why.starts_with("is writable by") {
        format!(
            "make it writable by its owner only (`sudo chmod go-w {}`; the integration_test role \
             makes the shared cache root:kvm 2750), after checking nothing in it was planted",
            show(&at)
        )
    } else if why.starts_with("belongs to") {
        "use a cache that belongs to this user or to root (BOMA_QVM_CACHE_DIR or --cache-dir), \
         or run the command as the cache's owner; remove entries others made (`sudo rm -r`) \
         after looking at them"
            .to_string()
    } else if why == "is a symlink" {
        format!(
            "remove the link (`rm {}`) and run the command again; boma-qvm makes this entry itself",
            show(&at)
        )
    } else {
        "check the cache directory's path and permissions".to_string()
    };
    Err(Error::image(
        format!(
            "refusing to use {what} {}: {} {why}, so another user could have changed what \
             boma-qvm would act on as this user",
            show(path),
            show(&at)
        ),
        fix,
    ))
}

/// Make `dir` (and missing parents) owner-writable only (0755), whatever the umask.
pub fn create_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| Error::Io {
            context: format!("creating {}", show(dir)),
            source: e,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn group_writable_foreign_or_linked_entries_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let cache = t.path().join("cache");
        let images = cache.join("images");
        create_dir(&images).unwrap();
        assert_eq!(untrusted(&images), None);

        chmod(&images, 0o2775);
        let (at, why) = untrusted(&images).unwrap();
        assert_eq!(at, images);
        assert!(why.contains("writable by its group"), "{why}");
        let e = check(&images, "the image cache").unwrap_err().to_string();
        assert!(e.contains("chmod go-w") && e.contains("2750"), "{e}");
        chmod(&images, 0o755);

        // A group-writable directory on the way lets others rename what is below it.
        chmod(&cache, 0o777);
        let (at, why) = untrusted(&images).unwrap();
        assert_eq!(at, cache);
        assert!(why.contains("every user"), "{why}");
        // A sticky one (like /tmp) does not.
        chmod(&cache, 0o1777);
        assert_eq!(untrusted(&images), None);
        chmod(&cache, 0o755);

        let link = cache.join("linked");
        std::os::unix::fs::symlink(&images, &link).unwrap();
        assert_eq!(untrusted(&link).unwrap().1, "is a symlink");

        std::os::unix::fs::chown(&images, Some(4242), None).unwrap();
        let why = untrusted(&images).unwrap().1;
        assert!(why.contains("uid 4242"), "{why}");
        let e = check(&images, "the image cache").unwrap_err();
        assert_eq!(e.exit_code(), 12);
        assert!(e.to_string().contains("BOMA_QVM_CACHE_DIR"), "{e}");
    }
}
