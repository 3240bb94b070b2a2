//! Disk faults, over QMP on a running VM, with no special set-up at boot.
//!
//! The VM's disk is a qcow2 node `disk0` whose `file` child is the file node `disk0-file`
//! (src/qemu/argv.rs) and whose `backing` child, for an overlay, is the golden image's node.
//! `disk_errors(true)` adds `blkdebug` nodes whose rules fail I/O with EIO from the moment they
//! open (event `none`): `disk0-faults` over `disk0-file` (reads, writes, write-zeroes, discards)
//! and, for an overlay, `disk0-backing-faults` over the backing node (reads), then
//! `blockdev-reopen`s `disk0` with `file: disk0-faults, backing: disk0-backing-faults`. Every
//! guest read and write now fails: data in the overlay and data still in the golden image
//! alike. The guest gets EIO, QEMU emits BLOCK_IO_ERROR (the device has
//! `werror=report,rerror=report`, so the VM keeps running). The golden image's own node is
//! only wrapped, never reopened: reopening QEMU's implicitly named backing node is refused
//! ("Cannot change the option 'node-name'") and, on 7.2, left it misreading clusters.
//! `disk_errors(false)` reopens `disk0` on its original children and deletes the blkdebug
//! nodes. Flushes are not failed: `blockdev-reopen` flushes the node first, and a failing flush
//! would make the way back impossible.

use super::{Fault, refused};
use crate::machine::Machine;
use crate::machine::events::Record;
use crate::machine::qemu::argv::DISK_NODE;
use crate::machine::qmp::Qmp;
use crate::{Error, Result};
use qapi::qmp::{
    BlockdevOptions, XDbgBlockGraphNodeType, blockdev_add, blockdev_del, blockdev_reopen,
    x_debug_query_block_graph,
};
use serde_json::{Value, json};

/// The blkdebug node over the overlay's file while disk errors are on.
pub const FAULT_NODE: &str = "disk0-faults";
/// The blkdebug node over the backing (golden image) node while disk errors are on.
pub const BACKING_FAULT_NODE: &str = "disk0-backing-faults";
const EIO: i64 = 5;
/// The block graph around `disk0`, by node name.
struct Graph(qapi::qmp::XDbgBlockGraph);

impl Graph {
    async fn query(ctl: &Qmp) -> Result<Graph> {
        let g = Graph(ctl.run(x_debug_query_block_graph {}).await?);
        if g.id(DISK_NODE).is_none() {
            return Err(Error::qemu(
                format!("QEMU has no block node `{DISK_NODE}`"),
                "was this VM started by this version of boma-qvm?",
            ));
        }
        Ok(g)
    }

    fn id(&self, name: &str) -> Option<u64> {
        self.0
            .nodes
            .iter()
            .find(|n| n.name == name && matches!(n.type_, XDbgBlockGraphNodeType::block_driver))
            .map(|n| n.id)
    }

    /// The node `parent`'s child `edge` (`file`, `backing`, `image`) points at.
    fn child(&self, parent: &str, edge: &str) -> Option<String> {
        let id = self.id(parent)?;
        let e = self
            .0
            .edges
            .iter()
            .find(|e| e.parent == id && e.name == edge)?;
        let n = self.0.nodes.iter().find(|n| n.id == e.child)?;
        Some(n.name.clone())
    }

    /// `disk0`'s file child and its backing node as they are without our blkdebug nodes.
    fn original(&self) -> Result<(String, Option<String>)> {
        let file = match self.child(DISK_NODE, "file") {
            Some(f) if f == FAULT_NODE => self.child(FAULT_NODE, "image"),
            other => other,
        }
        .ok_or_else(|| {
            Error::qemu(
                format!("block node `{DISK_NODE}` has no file child"),
                "report this as a bug",
            )
        })?;
        let backing = match self.child(DISK_NODE, "backing") {
            Some(b) if b == BACKING_FAULT_NODE => self.child(BACKING_FAULT_NODE, "image"),
            other => other,
        };
        Ok((file, backing))
    }

    fn errors_on(&self) -> bool {
        self.child(DISK_NODE, "file").as_deref() == Some(FAULT_NODE)
    }
}

fn options(v: Value) -> Result<BlockdevOptions> {
    serde_json::from_value(v).map_err(|e| {
        Error::qmp(
            format!("building blockdev options: {e}"),
            "this QEMU's block layer differs from what boma-qvm expects: report it with `qemu-system-x86_64 --version`",
        )
    })
}

/// `disk0` reopened on `file` and `backing` (`None`: it has no backing).
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

/// A blkdebug node `name` over `image` failing `iotypes` with EIO from the start.
fn blkdebug(name: &str, image: &str, iotypes: &[&str]) -> Value {
    let rules: Vec<Value> = iotypes
        .iter()
        .map(|io| json!({"event": "none", "iotype": io, "errno": EIO}))
        .collect();
    json!({
        "driver": "blkdebug",
        "node-name": name,
        "image": image,
        "inject-error": rules,
    })
}

async fn del(ctl: &Qmp, node: &str) -> Result<()> {
    ctl.run(blockdev_del {
        node_name: node.into(),
    })
    .await?;
    Ok(())
}

/// Splice the blkdebug nodes in; on failure, remove what was added.
async fn errors_on(ctl: &Qmp, file: &str, backing: Option<&str>) -> Result<()> {
    let data_io = ["read", "write", "write-zeroes", "discard"];
    ctl.run(blockdev_add(options(blkdebug(FAULT_NODE, file, &data_io))?))
        .await?;
    let mut added = vec![FAULT_NODE];
    let r = async {
        if let Some(b) = backing {
            ctl.run(blockdev_add(options(blkdebug(
                BACKING_FAULT_NODE,
                b,
                &["read"],
            ))?))
            .await?;
            added.push(BACKING_FAULT_NODE);
        }
        reopen_disk(ctl, FAULT_NODE, backing.map(|_| BACKING_FAULT_NODE)).await
    }
    .await;
    if r.is_err() {
        for n in added {
            let _ = del(ctl, n).await;
        }
    }
    r
}

impl Machine {
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
        let graph = Graph::query(&ctl).await?;
        let (file, backing) = graph.original()?;
        let already = graph.errors_on() == on;
        let detail = match (on, already) {
            (_, true) => format!("disk errors already {}", if on { "on" } else { "off" }),
            (true, false) => format!(
                "blkdebug under {DISK_NODE}: every read and write fails with EIO{}",
                if backing.is_some() {
                    " (overlay and backing image)"
                } else {
                    ""
                }
            ),
            (false, false) => {
                format!("{DISK_NODE} back on its own file and backing; blkdebug removed")
            }
        };
        let data = json!({"node": DISK_NODE, "file": file, "backing": backing});
        self.injecting(f, detail, data, async {
            if already {
                Ok(())
            } else if on {
                errors_on(&ctl, &file, backing.as_deref()).await
            } else {
                reopen_disk(&ctl, &file, backing.as_deref())
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
                del(&ctl, FAULT_NODE).await?;
                if graph.child(DISK_NODE, "backing").as_deref() == Some(BACKING_FAULT_NODE) {
                    del(&ctl, BACKING_FAULT_NODE).await?;
                }
                Ok(())
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::qemu::argv::DISK_FILE_NODE;

    #[test]
    fn blkdebug_options_round_trip_through_the_qapi_types() {
        let o = options(blkdebug(
            FAULT_NODE,
            DISK_FILE_NODE,
            &["read", "write", "write-zeroes", "discard"],
        ))
        .unwrap();
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
}
