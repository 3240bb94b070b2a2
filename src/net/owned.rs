//! What one network state made, and nothing else: the bridge, the nft table, the taps (and the
//! confinement veths) it created, and the directory under /run for dnsmasq's re-read files
//! (root with a private state dir, see `dnsmasq::run_as`), recorded in `net/owned.json` as they
//! are made. `down` and `prune` remove only what this record names, and only when the live
//! object is still the one recorded (same name, same ifindex, the same owner marker; for the
//! directory: still a directory of ours, not a symlink). A bridge, table or directory this
//! record does not name is never adopted, changed or deleted.
//!
//! Other states (and people) can tell our objects apart: the bridge's alias and the table's
//! comment carry [`marker`], naming the state that made them.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files::NetFiles;
use crate::error::IoContext;
use crate::paths::write_atomic;
use crate::{Error, Result, error::show};

/// A link this state created: its name and the ifindex it got (a later link of the same name,
/// made by someone else, has another ifindex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRecord {
    pub name: String,
    pub ifindex: u32,
    /// What it is for (a VM name for a tap, the holder of a confinement veth), for messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Everything this network state created and has not removed yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    /// The bridge, once this state created it.
    #[serde(default)]
    pub bridge: Option<LinkRecord>,
    /// Our nft table `inet boma_qvm` is loaded by this state (its comment is our marker).
    #[serde(default)]
    pub table: bool,
    /// Taps this state created for its VMs (non-persistent: they vanish with their QEMU).
    #[serde(default)]
    pub taps: Vec<LinkRecord>,
    /// Confinement veths (host ends on the bridge) handed to confined processes.
    #[serde(default)]
    pub veths: Vec<LinkRecord>,
    /// The directory this state made for the files dnsmasq re-reads as `nobody`
    /// (`/run/boma-qvm-dnsmasq-ID`), recorded before it is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dnsmasq_dir: Option<PathBuf>,
}

/// The marker our bridge's alias and our table's comment carry: which state made them.
/// Kept under the kernel's limits (256 bytes for both).
pub fn marker(files: &NetFiles) -> String {
    let dir = files.dir.display().to_string().replace('"', "'");
    if dir.len() <= 200 {
        format!("boma-qvm {dir}")
    } else {
        use sha2::Digest;
        let h = sha2::Sha256::digest(dir.as_bytes());
        format!("boma-qvm sha256:{}", hex::encode(&h[..16]))
    }
}

/// The state directory a marker names, if it is one of ours.
pub fn marker_state(marker: &str) -> Option<&str> {
    marker.strip_prefix("boma-qvm ")
}

impl Owned {
    /// The record of `files` (empty when there is none yet).
    pub fn load(files: &NetFiles) -> Result<Owned> {
        let path = files.owned();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Error::network(
                    format!("corrupt ownership record {}: {e}", show(&path)),
                    "look at it: it lists the bridge, nft table, taps and dnsmasq directory this \
                     state made; remove what it names by hand (`ip link del NAME`, \
                     `nft delete table inet boma_qvm`, `rm -r /run/boma-qvm-dnsmasq-ID`), \
                     then delete the file",
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Owned::default()),
            Err(e) => Err(e).ctx(|| format!("reading {}", show(&path))),
        }
    }

    fn save(&self, files: &NetFiles) -> Result<()> {
        let path = files.owned();
        if *self == Owned::default() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).ctx(|| format!("removing {}", show(&path)))
                }
                _ => Ok(()),
            };
        }
        let text = serde_json::to_string_pretty(self).expect("Owned serializes");
        write_atomic(&path, &text)
    }

    /// Read, change and write the record under the network's lock (a supervisor records its tap
    /// while a CLI registers a VM). Returns what `f` returned.
    pub fn update<T>(files: &NetFiles, f: impl FnOnce(&mut Owned) -> T) -> Result<T> {
        std::fs::create_dir_all(&files.dir).ctx(|| format!("creating {}", show(&files.dir)))?;
        let _lock = lock(&files.lock())?;
        let mut owned = Owned::load(files)?;
        let out = f(&mut owned);
        owned.save(files)?;
        Ok(out)
    }
}

/// An exclusive flock on `path`, held until the value drops.
fn lock(path: &Path) -> Result<nix::fcntl::Flock<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ctx(|| format!("opening {}", show(path)))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
        Error::network(
            format!("cannot lock {}: {e}", show(path)),
            "check the state directory's file system",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_an_empty_one_is_no_file() {
        let tmp = tempfile::tempdir().unwrap();
        let files = NetFiles {
            dir: tmp.path().join("net"),
        };
        assert_eq!(Owned::load(&files).unwrap(), Owned::default());
        Owned::update(&files, |o| {
            o.bridge = Some(LinkRecord {
                name: "boma-qvm0".into(),
                ifindex: 7,
                owner: None,
            });
            o.table = true;
        })
        .unwrap();
        let o = Owned::load(&files).unwrap();
        assert_eq!(o.bridge.as_ref().unwrap().ifindex, 7);
        assert!(o.table);
        Owned::update(&files, |o| *o = Owned::default()).unwrap();
        assert!(!files.owned().exists(), "an empty record leaves no file");
        std::fs::write(files.owned(), "{not json").unwrap();
        let e = Owned::load(&files).unwrap_err().to_string();
        assert!(
            e.contains("corrupt ownership record") && e.contains("fix:"),
            "{e}"
        );
    }

    #[test]
    fn marker_names_the_state_and_stays_short() {
        let files = NetFiles {
            dir: "/tmp/bq1/state/net".into(),
        };
        assert_eq!(marker(&files), "boma-qvm /tmp/bq1/state/net");
        assert_eq!(marker_state(&marker(&files)), Some("/tmp/bq1/state/net"));
        assert_eq!(marker_state("docker bridge"), None);
        let long = NetFiles {
            dir: format!("/{}", "x".repeat(300)).into(),
        };
        let m = marker(&long);
        assert!(m.len() < 100 && m.starts_with("boma-qvm sha256:"), "{m}");
    }
}
