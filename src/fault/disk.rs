//! Disk faults, over QMP on a running VM, with no special set-up at boot.
//!
//! The VM's disk is a qcow2 node `disk0` whose `file` child is the file node `disk0-file`
//! (src/qemu/argv.rs). `disk_errors(true)` adds a `blkdebug` node `disk0-faults` over
//! `disk0-file` whose rules fail every read, write, write-zeroes and discard with EIO (event
//! `none`: active from the moment it opens), then `blockdev-reopen`s `disk0` with
//! `file: disk0-faults` (keeping its backing node). The guest gets EIO, QEMU emits
//! BLOCK_IO_ERROR (the device has `werror=report,rerror=report`, so the VM keeps running).
//! `disk_errors(false)` reopens `disk0` on `disk0-file` again and deletes the blkdebug node.
//! Flushes are not failed: `blockdev-reopen` flushes the node first, and a failing flush would
//! make the switch back impossible.
//!
//! After a power cut, `check_overlay` runs `qemu-img check` on the overlay before it boots again.

use super::{Fault, Target, refused};
use crate::events::{self, Record, Source};
use crate::qemu::argv::{DISK_FILE_NODE, DISK_NODE};
use crate::qmp::Qmp;
use crate::vm::Vm;
use crate::{Error, Result};
use qapi::qmp::{
    BlockdevOptions, XDbgBlockGraphNodeType, blockdev_add, blockdev_del, blockdev_reopen,
    x_debug_query_block_graph,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The blkdebug node spliced in while disk errors are on.
pub const FAULT_NODE: &str = "disk0-faults";
/// The record `power_on` writes with the overlay's `qemu-img check` result.
pub const DISK_CHECK: &str = "DISK_CHECK";
const EIO: i64 = 5;

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
        .map_err(|e| Error::MissingTool {
            program: "qemu-img".into(),
            fix: format!("install qemu-utils ({e})"),
        })?;
    // 0: clean, 2: corruptions, 3: leaks only; 1 and others: the check itself failed.
    let parsed = match out.status.code() {
        Some(0 | 2 | 3) => serde_json::from_slice::<OverlayCheck>(&out.stdout).ok(),
        _ => None,
    };
    let Some(check) = parsed else {
        return Err(Error::Command {
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

/// The current `file` child and the backing node of the qcow2 node `disk0`.
async fn disk_children(ctl: &Qmp) -> Result<(String, Option<String>)> {
    let g = ctl.run(x_debug_query_block_graph {}).await?;
    let id = g
        .nodes
        .iter()
        .find(|n| n.name == DISK_NODE && matches!(n.type_, XDbgBlockGraphNodeType::block_driver))
        .map(|n| n.id)
        .ok_or_else(|| {
            Error::qemu(
                format!("QEMU has no block node `{DISK_NODE}`"),
                "was this VM started by this version of boma-qvm?",
            )
        })?;
    let child = |edge: &str| {
        g.edges
            .iter()
            .find(|e| e.parent == id && e.name == edge)
            .and_then(|e| g.nodes.iter().find(|n| n.id == e.child))
            .map(|n| n.name.clone())
    };
    let file = child("file").ok_or_else(|| {
        Error::qemu(
            format!("block node `{DISK_NODE}` has no file child"),
            "report this as a bug",
        )
    })?;
    Ok((file, child("backing")))
}

fn options(v: Value) -> Result<BlockdevOptions> {
    serde_json::from_value(v).map_err(|e| Error::Qmp(format!("building blockdev options: {e}")))
}

/// `disk0` reopened with `file` as its file child; its backing node (if any) kept.
async fn reopen_disk(ctl: &Qmp, file: &str, backing: Option<&str>) -> Result<()> {
    let mut o = json!({"driver": "qcow2", "node-name": DISK_NODE, "file": file});
    if let Some(b) = backing {
        o["backing"] = json!(b);
    }
    ctl.run(blockdev_reopen {
        options: vec![options(o)?],
    })
    .await?;
    Ok(())
}

fn blkdebug_rules() -> Value {
    let rules: Vec<Value> = ["read", "write", "write-zeroes", "discard"]
        .iter()
        .map(|io| json!({"event": "none", "iotype": io, "errno": EIO}))
        .collect();
    json!({
        "driver": "blkdebug",
        "node-name": FAULT_NODE,
        "image": DISK_FILE_NODE,
        "inject-error": rules,
    })
}

impl Target {
    /// Make the VM's disk fail every read and write with EIO (`true`), or work again (`false`).
    /// The guest sees EIO; QEMU records BLOCK_IO_ERROR events; the VM keeps running.
    /// Idempotent. See the module docs for the QMP commands.
    pub async fn disk_errors(&self, on: bool) -> Result<Record> {
        let f = if on {
            Fault::DiskErrorsOn
        } else {
            Fault::DiskErrorsOff
        };
        self.require_running(f)?;
        if self.vm.spec()?.disk.is_none() {
            return Err(refused(
                f,
                &self.vm.name,
                "has no disk",
                "give the VM a disk (an image VM, or `VmSpec::disk`)",
            ));
        }
        let ctl = self.vm.ctl().await?;
        let (file, backing) = disk_children(&ctl).await?;
        let already = (file == FAULT_NODE) == on;
        let detail = match (on, already) {
            (_, true) => format!("disk errors already {}", if on { "on" } else { "off" }),
            (true, false) => {
                format!(
                    "blkdebug node {FAULT_NODE} under {DISK_NODE}: reads and writes fail with EIO"
                )
            }
            (false, false) => format!("{DISK_NODE} back on {DISK_FILE_NODE}; {FAULT_NODE} removed"),
        };
        let data = json!({"node": DISK_NODE, "backing": backing});
        self.injecting(f, detail, data, async {
            if already {
                return Ok(());
            }
            if on {
                ctl.run(blockdev_add(options(blkdebug_rules())?)).await?;
                if let Err(e) = reopen_disk(&ctl, FAULT_NODE, backing.as_deref()).await {
                    let _ = ctl.run(blockdev_del { node_name: FAULT_NODE.into() }).await;
                    return Err(e);
                }
            } else {
                reopen_disk(&ctl, DISK_FILE_NODE, backing.as_deref())
                    .await
                    .map_err(|e| {
                        Error::qemu(
                            format!("could not switch {}'s disk errors off: {e}", self.vm.name),
                            format!(
                                "the disk keeps failing; power-cycle the VM (`boma-qvm fault {0} power-cut`, then `power-on`)",
                                self.vm.name
                            ),
                        )
                    })?;
                ctl.run(blockdev_del {
                    node_name: FAULT_NODE.into(),
                })
                .await?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkdebug_options_round_trip_through_the_qapi_types() {
        let o = options(blkdebug_rules()).unwrap();
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["driver"], "blkdebug");
        assert_eq!(v["image"], DISK_FILE_NODE);
        assert_eq!(v["node-name"], FAULT_NODE);
        let rules = v["inject-error"].as_array().unwrap();
        assert_eq!(rules.len(), 4);
        assert!(
            rules
                .iter()
                .all(|r| r["event"] == "none" && r["errno"] == EIO)
        );
        assert!(
            rules.iter().all(|r| r["iotype"] != "flush"),
            "a failing flush would make blockdev-reopen back impossible"
        );
    }

    #[test]
    fn qcow2_reopen_options_keep_the_backing_reference() {
        let o = options(json!({"driver": "qcow2", "node-name": DISK_NODE, "file": FAULT_NODE, "backing": "#block142"}))
            .unwrap();
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["file"], FAULT_NODE);
        assert_eq!(v["backing"], "#block142");
    }

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
