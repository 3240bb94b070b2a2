//! After a power cut, `power_on` runs `qemu-img check` on the overlay before it boots again:
//! SIGKILLed QEMU may leave leaked clusters (allocated, unreferenced: wasted space, no harm),
//! never corruption, because qcow2 writes refcounts before the L2 entries that use them.

use crate::machine::events::{self, Record, Source};
use crate::machine::vm::Vm;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The record `power_on` writes with the overlay's `qemu-img check` result.
pub use crate::machine::events::names::DISK_CHECK;

/// `qemu-img check` of a VM's overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayCheck {
    #[serde(default)]
    pub leaks: u64,
    #[serde(default)]
    pub corruptions: u64,
    #[serde(default, rename = "check-errors")]
    pub check_errors: u64,
    #[serde(default, rename = "allocated-clusters")]
    pub allocated_clusters: u64,
}

impl OverlayCheck {
    pub fn summary(&self) -> String {
        match (self.corruptions, self.leaks) {
            (0, 0) => "no errors".into(),
            (0, l) => format!("{l} leaked clusters (wasted space, no harm to data)"),
            (c, l) => format!("{c} corruptions, {l} leaked clusters"),
        }
    }
}

/// `qemu-img check` the VM's overlay (None when it has no disk), record the result as a
/// `DISK_CHECK` record, and refuse an overlay with corruptions.
pub async fn check_overlay(vm: &Vm) -> Result<Option<OverlayCheck>> {
    let Some(disk) = vm.spec()?.disk else {
        return Ok(None);
    };
    let out = tokio::process::Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(&disk)
        .output()
        .await
        .map_err(|e| Error::missing_tool("qemu-img", format!("install qemu-utils ({e})")))?;
    // 0: clean, 2: corruptions, 3: leaks only; 1 and others: the check itself failed.
    let parsed = match out.status.code() {
        Some(0 | 2 | 3) => serde_json::from_slice::<OverlayCheck>(&out.stdout).ok(),
        _ => None,
    };
    let Some(check) = parsed else {
        return Err(Error::Command {
            fix: crate::error::COMMAND_FIX.into(),
            cmd: format!("qemu-img check --output=json {}", disk.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    };
    let rec = Record::new(
        Source::Boma,
        DISK_CHECK,
        json!({"disk": disk, "check": check, "summary": check.summary()}),
    );
    events::append(&vm.run.events(), &rec)?;
    tracing::info!("{}: qemu-img check: {}", vm.name, check.summary());
    if check.corruptions > 0 {
        return Err(Error::image(
            format!(
                "{}'s overlay {} has {} corruptions",
                vm.name,
                disk.display(),
                check.corruptions
            ),
            format!(
                "inspect it with `qemu-img check {0}` (`-r all` repairs), or recreate the VM",
                disk.display()
            ),
        ));
    }
    Ok(Some(check))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_output_parses_with_and_without_leaks() {
        let clean: OverlayCheck = serde_json::from_str(
            r#"{"image-end-offset": 262144, "total-clusters": 327680, "check-errors": 0, "filename": "ov.qcow2", "format": "qcow2"}"#,
        )
        .unwrap();
        assert_eq!(clean.summary(), "no errors");
        let leaky: OverlayCheck = serde_json::from_str(
            r#"{"leaks": 4, "check-errors": 0, "allocated-clusters": 1000, "format": "qcow2"}"#,
        )
        .unwrap();
        assert_eq!(leaky.leaks, 4);
        assert!(leaky.summary().contains("4 leaked clusters"));
    }
}
