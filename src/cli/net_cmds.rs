//! Network and host-check subcommands: `net up|down|status`, `doctor`.

use boma_qvm::machine::Machine;
use boma_qvm::machine::accel::KvmProbe;
use boma_qvm::net::{self, NetConfig, Network};
use boma_qvm::paths::Dirs;
use boma_qvm::{Error, Result};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum NetCmd {
    /// Build (or repair) the isolated network: bridge, nft table, dnsmasq.
    Up {
        #[arg(long, default_value = net::config::DEFAULT_BRIDGE)]
        bridge: String,
        #[arg(long, default_value = net::config::DEFAULT_SUBNET)]
        subnet: String,
    },
    /// Remove dnsmasq, our nft table and the bridge (refused while VMs exist).
    Down,
    /// Show the network's health.
    Status,
}

pub async fn net(dirs: &Dirs, cmd: NetCmd) -> Result<()> {
    match cmd {
        NetCmd::Up { bridge, subnet } => {
            let cfg = NetConfig {
                bridge,
                subnet: subnet.parse()?,
                upstream_dns: None,
            };
            let n = Network::up(dirs, &cfg).await?;
            println!("{}", n.status().await?);
        }
        NetCmd::Down => {
            let vms = Machine::list(dirs);
            if !vms.is_empty() {
                return Err(Error::input(
                    format!("VMs still exist: {}", vms.join(", ")),
                    "`boma-qvm down` them first (or `boma-qvm prune`)",
                ));
            }
            Network::saved(dirs).down().await?;
            println!("network down");
        }
        NetCmd::Status => {
            let n = Network::saved(dirs);
            println!("{}", n.status().await?);
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct DoctorArgs {}

/// Print warnings with their fixes; exit non-zero when there are any.
pub async fn doctor(dirs: &Dirs, _a: DoctorArgs) -> Result<()> {
    let mut problems = 0;
    let probe = KvmProbe::read();
    if probe.usable() {
        println!("ok: KVM is usable");
    } else {
        println!(
            "note: {}; VMs run under TCG (slower, still correct)",
            probe.reason()
        );
    }
    let bad = boma_qvm::settings::problems(dirs);
    if bad.is_empty() {
        println!("ok: settings and directories");
    }
    for e in bad {
        problems += 1;
        println!("BAD SETTING: {e}");
    }
    let avail = boma_qvm::machine::guard::mem_available_mib()?;
    let need = boma_qvm::machine::guard::threshold_mib(
        boma_qvm::machine::spec::DEFAULT_MEMORY_MIB as u64,
        std::env::var("BOMA_QVM_MIN_FREE_MIB")
            .ok()
            .and_then(|v| v.parse().ok()),
    );
    if avail >= need {
        println!("ok: {avail} MiB of RAM available (a default 3 GiB VM needs {need} MiB)");
    } else {
        problems += 1;
        println!("LOW RAM: {avail} MiB available, a default 3 GiB VM needs {need} MiB");
    }
    for tool in [
        "qemu-system-x86_64",
        "qemu-img",
        "dnsmasq",
        "nft",
        "genisoimage",
        "ssh",
        "ansible-playbook",
    ] {
        if boma_qvm::tools::find(tool).is_some() {
            println!("ok: {tool}");
        } else {
            problems += 1;
            println!("MISSING: {tool} (install with the integration_test role: `make setup`)");
        }
    }
    for w in net::doctor(&Network::saved_config(dirs))? {
        problems += 1;
        println!("WARNING: {}\n  fix: {}", w.problem, w.fix);
    }
    if problems > 0 {
        return Err(Error::input(
            format!("doctor found {problems} problem(s)"),
            "apply the fixes printed above",
        ));
    }
    println!("doctor: all good");
    Ok(())
}
