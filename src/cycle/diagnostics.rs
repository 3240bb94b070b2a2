//! The post-mortem a failed run leaves in its run directory, so someone who was not there can see
//! why: the console (the automated Hetzner console), events.jsonl, and the guest's own view
//! (`nft list ruleset`, `docker ps -a`, `ss -tlnp`, `journalctl -b`,
//! `systemd-analyze critical-chain`) over SSH, or through the QEMU guest agent when SSH is dead
//! (the incident signature), so the ruleset that locked everyone out is still captured.

use crate::Result;
use crate::error::IoContext;
use crate::guest::ssh;
use crate::machine::{Machine, qga};
use crate::secrets::Scrubber;
use std::path::Path;
use std::time::Duration;

/// File name and the guest command that fills it.
pub const GUEST_COMMANDS: &[(&str, &str)] = &[
    ("nft-ruleset.txt", "sudo -n nft list ruleset"),
    ("docker-ps.txt", "sudo -n docker ps -a"),
    ("ss-tlnp.txt", "sudo -n ss -tlnp"),
    ("journal.txt", "sudo -n journalctl -b --no-pager"),
    (
        "critical-chain.txt",
        "systemd-analyze critical-chain --no-pager",
    ),
    ("systemctl-failed.txt", "systemctl --failed --no-pager"),
];

/// Copy the console log and events, and capture the guest commands if SSH answers. Returns the
/// list of files written. Never fails the run further: a capture that fails is noted in its file.
/// Every file is written through `scrubber` (the run's secrets: the guest may print them).
pub async fn collect(m: &Machine, out: &Path, scrubber: &Scrubber) -> Result<Vec<String>> {
    let vm = &m.vm;
    let conn = m.conn().ok();
    let conn = conn.as_ref();
    let mut written = copy_console_and_events(m, out, scrubber)?;
    let reachable = match conn {
        Some(c) => ssh::run(c, "true", Duration::from_secs(20))
            .await
            .map(|o| o.status.success())
            .unwrap_or(false),
        None => false,
    };
    for (file, cmd) in GUEST_COMMANDS {
        let text = match conn.filter(|_| reachable) {
            Some(c) => match ssh::run(c, cmd, Duration::from_secs(60)).await {
                Ok(o) => format!(
                    "$ {cmd}\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => format!("$ {cmd}\n(capture failed: {e})\n"),
            },
            None => through_agent(vm, cmd).await,
        };
        scrubber.write(&out.join(file), text)?;
        written.push(file.to_string());
    }
    Ok(written)
}

/// The host-side part of the post-mortem: `console.log`, `events.jsonl` and `console-tail.txt`
/// (its last 80 lines), copied through `scrubber` into `out`. Returns the files written.
pub fn copy_console_and_events(
    m: &Machine,
    out: &Path,
    scrubber: &Scrubber,
) -> Result<Vec<String>> {
    let vm = &m.vm;
    std::fs::create_dir_all(out).ctx(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    for (src, name) in [
        (vm.run.console_log(), "console.log"),
        (vm.run.events(), "events.jsonl"),
    ] {
        if scrubber.copy(&src, &out.join(name)).is_ok() {
            written.push(name.to_string());
        }
    }
    let tail = vm.console_tail(80);
    scrubber.write(&out.join("console-tail.txt"), &tail)?;
    written.push("console-tail.txt".into());
    Ok(written)
}

/// The same capture without the network: the guest agent runs the command as root.
async fn through_agent(vm: &crate::machine::vm::Vm, cmd: &str) -> String {
    let plain = cmd.strip_prefix("sudo -n ").unwrap_or(cmd);
    match qga::exec(
        &vm.run.qga_sock(),
        &["/bin/sh", "-c", plain],
        Duration::from_secs(60),
    )
    .await
    {
        Ok(o) => format!(
            "$ {plain}    (through the guest agent: SSH does not answer)\n{}{}",
            o.stdout, o.stderr
        ),
        Err(e) => format!(
            "$ {plain}\n(not captured: SSH does not answer and neither does the guest agent: {e}; see console.log)\n"
        ),
    }
}

/// How to look at a kept VM, for INSPECT.txt and the terminal.
pub fn inspect_text(host: &str, run_dir: &Path) -> String {
    format!(
        "The VM boma-it-{host} was kept for inspection.\n\
         \n  boma-qvm console {host}          attach to its serial console (Ctrl-] detaches)\
         \n  boma-qvm console {host} --log    the captured console\
         \n  boma-qvm ssh {host}              a shell as `ansible` (sudo works)\
         \n  boma-qvm status {host}           state, address, last event\
         \n  boma-qvm verify {host}           re-run the verify playbook\
         \n  boma-qvm diff {host}             what changed since the apply (its state now vs after the apply)\
         \n  boma-qvm down {host}             destroy it (or `make test-integration-clean`)\
         \n\nEvidence: {}\n",
        run_dir.display()
    )
}
