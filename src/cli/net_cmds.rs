//! Network and host-check subcommands: `net up|down|status`, `doctor`.

use boma_qvm::accel::KvmProbe;
use boma_qvm::net::{self, NetConfig, Network};
use boma_qvm::paths::Dirs;
use boma_qvm::provision::saved_net_config;
use boma_qvm::{Error, Result, ansible, vm};
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
            let vms = vm::list(dirs);
            if !vms.is_empty() {
                return Err(Error::input(
                    format!("VMs still exist: {}", vms.join(", ")),
                    "`boma-qvm down` them first (or `boma-qvm prune`)",
                ));
            }
            Network::attach(dirs, &saved_net_config(dirs))
                .down()
                .await?;
            println!("network down");
        }
        NetCmd::Status => {
            let n = Network::attach(dirs, &saved_net_config(dirs));
            println!("{}", n.status().await?);
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct DoctorArgs {}

/// The Ansible boma-qvm will run, its version and where that choice came from; the number of
/// problems found.
fn check_ansible() -> usize {
    let mut problems = 0;
    match ansible::locate("ansible-playbook") {
        Ok(found) => {
            let out = std::process::Command::new(&found.path)
                .arg("--version")
                .output();
            let text = out
                .as_ref()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let first = text.lines().next().unwrap_or("").trim();
            let from = format!("from {}", found.origin);
            match ansible::core_version(&text) {
                Some(v) if (v.0, v.1) >= ansible::MIN_VERSION => println!(
                    "ok: ansible-playbook {} (ansible-core {}.{}.{}), {from}",
                    found.path.display(),
                    v.0,
                    v.1,
                    v.2
                ),
                Some(v) => {
                    problems += 1;
                    println!(
                        "OLD: ansible-playbook {} (ansible-core {}.{}.{}), {from}: boma-qvm needs ansible-core >= {}.{}\n  fix: point {} at a newer one (`.ci/setup` installs ansible-core into /opt/boma-qvm-ansible and records it)",
                        found.path.display(),
                        v.0,
                        v.1,
                        v.2,
                        ansible::MIN_VERSION.0,
                        ansible::MIN_VERSION.1,
                        ansible::DIR_VAR
                    );
                }
                None => {
                    problems += 1;
                    let why = match &out {
                        Ok(o) => format!(
                            "`--version` said {:?} ({})",
                            first,
                            String::from_utf8_lossy(&o.stderr).trim()
                        ),
                        Err(e) => format!("it does not run: {e}"),
                    };
                    println!(
                        "BROKEN: ansible-playbook {}, {from}: {why}\n  fix: repair or reinstall that Ansible, or point {} at a working one",
                        found.path.display(),
                        ansible::DIR_VAR
                    );
                }
            }
        }
        Err(e) => {
            // The others would only repeat the same fix.
            println!("MISSING: {e}");
            return 1;
        }
    }
    for tool in ["ansible-inventory", "ansible"] {
        if let Err(e) = ansible::locate(tool) {
            problems += 1;
            println!("MISSING: {e}");
        }
    }
    problems
}

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
    let avail = boma_qvm::guard::mem_available_mib()?;
    let need = boma_qvm::guard::threshold_mib(
        3072,
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
    ] {
        if boma_qvm::tools::find(tool).is_some() {
            println!("ok: {tool}");
        } else {
            problems += 1;
            println!("MISSING: {tool} (install with the integration_test role: `make setup`)");
        }
    }
    problems += check_ansible();
    for w in net::doctor(&saved_net_config(dirs))? {
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
