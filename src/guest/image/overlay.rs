//! Throwaway qcow2 overlays backed by a golden image. The VM writes only to its overlay; the
//! golden file is opened read-only as the backing file and never changes.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::error::{Error, Result, show};

const QEMU_IMG_FIX: &str = "apt-get install qemu-utils";

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub format: String,
    pub virtual_size: u64,
    /// The backing file as recorded in the image (absolute for overlays made by `create`).
    pub backing: Option<PathBuf>,
    pub backing_format: Option<String>,
}

#[derive(Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing: Option<String>,
    #[serde(rename = "backing-filename-format")]
    backing_format: Option<String>,
}

/// `qemu-img info -U --output=json PATH` (`-U`: also works while a running QEMU holds the image).
pub fn info(path: &Path) -> Result<Info> {
    crate::tools::require("qemu-img", QEMU_IMG_FIX)?;
    let out = crate::tools::run(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(path),
    )?;
    let raw: RawInfo = serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::image(
            format!("cannot read `qemu-img info` for {}: {e}", show(path)),
            "check the file is a disk image",
        )
    })?;
    Ok(Info {
        format: raw.format,
        virtual_size: raw.virtual_size,
        backing: raw.backing.map(PathBuf::from),
        backing_format: raw.backing_format,
    })
}

/// Create `overlay` as a qcow2 backed by `golden` (`qemu-img create -f qcow2 -b GOLDEN -F qcow2
/// OVERLAY [SIZE]`). `size` (bytes) grows the virtual disk; cloud-init's resizefs then grows the
/// root filesystem on first boot. The backing path is stored absolute so the overlay works from
/// any directory. Refuses to overwrite an existing overlay.
pub fn create(golden: &Path, overlay: &Path, size: Option<u64>) -> Result<()> {
    let golden = std::fs::canonicalize(golden).map_err(|_| {
        Error::not_found(
            format!("golden image {}", show(golden)),
            "get one with `boma-qvm image pull` or `boma-qvm image build`",
        )
    })?;
    if overlay.exists() {
        return Err(Error::AlreadyExists {
            what: format!("overlay {}", show(overlay)),
            fix: "remove the VM first (`boma-qvm down`) or pick another path".into(),
        });
    }
    let g = info(&golden)?;
    if g.format != "qcow2" {
        return Err(Error::image(
            format!("golden image {} is {}, not qcow2", show(&golden), g.format),
            "import it as qcow2 (`qemu-img convert -O qcow2 IN OUT`, then `boma-qvm image import OUT`)",
        ));
    }
    if let Some(s) = size
        && s < g.virtual_size
    {
        return Err(Error::input(
            format!(
                "disk size {s} bytes is smaller than the golden image's {} bytes",
                g.virtual_size
            ),
            "give a disk size at least as large as the image (or none to keep its size)",
        ));
    }
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(&golden)
        .args(["-F", "qcow2"])
        .arg(overlay);
    if let Some(s) = size {
        cmd.arg(s.to_string());
    }
    crate::tools::run(&mut cmd)?;
    tracing::debug!("overlay {} backed by {}", show(overlay), show(&golden));
    Ok(())
}
