//! The faults themselves: power, reset/reboot, link, freeze/thaw, NMI, egress. Each checks the
//! VM's state first (refusing with the fix), records itself, injects, and returns once the event
//! that proves it is in events.jsonl where there is one (QEMU_EXITED, RESET, STOP, RESUME).

use super::{Fault, refused};
use crate::machine::Machine;
use crate::machine::events::{Record, names};
use crate::machine::power::{self, RebootMode};
use crate::machine::qemu::argv::NETDEV_ID;
use crate::machine::qmp::Qmp;
use crate::{Error, Result};
use qapi::qmp::{RunState, cont, inject_nmi, query_status, set_link, stop};
use serde_json::json;
use std::time::Duration;

/// How long a QMP-level state change (STOP, RESUME) may take to show in the events.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

fn run_state_name(s: RunState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{s:?}"))
}

impl Machine {
    async fn run_state(&self, ctl: &Qmp) -> Result<RunState> {
        Ok(ctl.run(query_status {}).await?.status)
    }

    /// QEMU's run state as QMP names it: `running`, `paused`, `guest-panicked`, `shutdown`, ...
    pub async fn qemu_state(&self) -> Result<String> {
        let ctl = self.vm.ctl().await?;
        Ok(run_state_name(self.run_state(&ctl).await?))
    }

    /// QEMU runs and the guest is not frozen (or otherwise stopped); the control connection.
    async fn require_guest_running(&self, fault: Fault) -> Result<Qmp> {
        self.require_running(fault)?;
        let ctl = self.vm.ctl().await?;
        match self.run_state(&ctl).await? {
            RunState::running => Ok(ctl),
            RunState::paused => Err(refused(
                fault,
                &self.vm.name,
                "is frozen",
                format!("thaw it first (`boma-qvm fault {} thaw`)", self.vm.name),
            )),
            other => Err(refused(
                fault,
                &self.vm.name,
                &format!("is in QEMU state `{}`", run_state_name(other)),
                "wait until it runs again (`boma-qvm status`), or cut its power (`power-cut`)",
            )),
        }
    }

    fn require_nic(&self, fault: Fault) -> Result<()> {
        if self.vm.spec()?.nic.is_some() {
            return Ok(());
        }
        Err(refused(
            fault,
            &self.vm.name,
            "has no NIC",
            "create the VM with a network (without `--no-net`)",
        ))
    }

    /// The reset button (`system_reset`): no guest shutdown path. Returns after RESET.
    pub async fn hard_reset(&self) -> Result<Record> {
        let f = Fault::Reset;
        drop(self.require_guest_running(f).await?);
        let t = self.scaled(Duration::from_secs(30));
        self.injecting(
            f,
            "system_reset: the reset button, no guest shutdown".into(),
            json!({}),
            power::reboot(&self.vm, RebootMode::Hard, t),
        )
        .await
    }

    /// A clean reboot as a recorded fault: `Machine::reboot` (ACPI power button, the guest's
    /// shutdown path, reset; proven by RESET and, with SSH, a new boot_id).
    pub async fn clean_reboot(&self) -> Result<Record> {
        let f = Fault::Reboot;
        drop(self.require_guest_running(f).await?);
        self.injecting(
            f,
            "ACPI power button, guest shutdown, then reset".into(),
            json!({}),
            self.reboot(),
        )
        .await
    }

    /// Take the VM's NIC link down (`false`) or up (`true`) with QMP `set_link`: the guest sees
    /// carrier loss, keeps its address, and no frame passes. Idempotent.
    pub async fn link(&self, up: bool) -> Result<Record> {
        let f = if up { Fault::LinkUp } else { Fault::LinkDown };
        self.require_running(f)?;
        self.require_nic(f)?;
        let ctl = self.vm.ctl().await?;
        let detail = format!("set_link {NETDEV_ID} {}", if up { "on" } else { "off" });
        self.injecting(f, detail, json!({"netdev": NETDEV_ID}), async {
            ctl.run(set_link {
                name: NETDEV_ID.into(),
                up,
            })
            .await
        })
        .await
    }

    /// Freeze the VM (`stop`): vCPUs halt, the guest's clock stops, nothing it runs answers.
    /// Returns after STOP.
    pub async fn freeze(&self) -> Result<Record> {
        let f = Fault::Freeze;
        self.require_running(f)?;
        let ctl = self.vm.ctl().await?;
        match self.run_state(&ctl).await? {
            RunState::running => {}
            RunState::paused => {
                return Err(refused(
                    f,
                    &self.vm.name,
                    "is already frozen",
                    format!("thaw it with `boma-qvm fault {} thaw`", self.vm.name),
                ));
            }
            other => {
                return Err(refused(
                    f,
                    &self.vm.name,
                    &format!("is in QEMU state `{}`", run_state_name(other)),
                    "only a running VM can be frozen",
                ));
            }
        }
        let mut tail = self.vm.tail();
        self.injecting(f, "stop: vCPUs halted".into(), json!({}), async {
            ctl.run(stop {}).await?;
            tail.wait_for(names::STOP, EVENT_TIMEOUT, |r| r.is(names::STOP))
                .await
        })
        .await
    }

    /// Thaw a frozen VM (`cont`). The guest's system clock resumes where it stopped (it lags by
    /// the time frozen until something such as NTP resyncs it); its RTC kept running. Returns
    /// after RESUME.
    pub async fn thaw(&self) -> Result<Record> {
        let f = Fault::Thaw;
        self.require_running(f)?;
        let ctl = self.vm.ctl().await?;
        match self.run_state(&ctl).await? {
            RunState::paused => {}
            RunState::running => {
                return Err(refused(
                    f,
                    &self.vm.name,
                    "is not frozen",
                    format!("freeze it first (`boma-qvm fault {} freeze`)", self.vm.name),
                ));
            }
            other => {
                return Err(refused(
                    f,
                    &self.vm.name,
                    &format!("is in QEMU state `{}`, not frozen", run_state_name(other)),
                    "only a VM frozen with `freeze` can be thawed",
                ));
            }
        }
        let mut tail = self.vm.tail();
        self.injecting(f, "cont: vCPUs run again".into(), json!({}), async {
            ctl.run(cont {}).await?;
            tail.wait_for(names::RESUME, EVENT_TIMEOUT, |r| r.is(names::RESUME))
                .await
        })
        .await
    }

    /// Freeze, wait `d`, thaw. Returns the thaw's record.
    pub async fn freeze_for(&self, d: Duration) -> Result<Record> {
        self.freeze().await?;
        tokio::time::sleep(d).await;
        self.thaw().await
    }

    /// An NMI on every vCPU (`inject-nmi`); Linux logs "Uhhuh. NMI received for unknown
    /// reason" (or panics, with `kernel.unknown_nmi_panic`).
    pub async fn nmi(&self) -> Result<Record> {
        let f = Fault::Nmi;
        self.require_running(f)?;
        let ctl = self.vm.ctl().await?;
        self.injecting(f, "inject-nmi on every vCPU".into(), json!({}), async {
            ctl.run(inject_nmi {}).await
        })
        .await
    }

    /// Cut (`false`) or restore (`true`) the VM's outbound NAT on the running VM: its address
    /// goes into (or out of) our nft table's no-egress set, so forwarding beyond the subnet and
    /// masquerade stop, established connections included; the host still reaches the VM.
    /// Upstream DNS follows (dnsmasq forwards only while every VM has egress). Idempotent.
    pub async fn egress(&self, on: bool) -> Result<Record> {
        let f = if on {
            Fault::EgressOn
        } else {
            Fault::EgressOff
        };
        self.require_running(f)?;
        self.require_nic(f)?;
        let ip = self.ip()?;
        let access = self.net_access()?.ok_or_else(|| {
            Error::network(
                format!("{} has no NIC", self.name()),
                "it was started without a network",
            )
        })?;
        let detail = format!(
            "outbound NAT {} for {ip} (nft set no_egress)",
            if on { "restored" } else { "cut" }
        );
        let name = self.name().to_string();
        self.injecting(f, detail, json!({"ip": ip.to_string()}), async {
            access.set_egress(&name, ip, on).await
        })
        .await
    }
}
