//! Network and host-check subcommands: `net up|down|status`, `doctor [--boot-test]`.

use boma_qvm::machine::accel::{self, AccelChoice, KvmProbe};
use boma_qvm::machine::boottest;
use boma_qvm::machine::{Machine, StartOptions};
use boma_qvm::net::access::NetAccess;
use boma_qvm::net::{self, NetConfig, Network};
use boma_qvm::paths::Dirs;
use boma_qvm::{Error, Result, ansible};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

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
    let access = NetAccess::choose(dirs)?;
    match cmd {
        NetCmd::Up { bridge, subnet } => {
            let cfg = NetConfig {
                bridge,
                subnet: subnet.parse()?,
                upstream_dns: None,
            };
            access.up(&cfg).await?;
            println!("{}", access.status().await?);
        }
        NetCmd::Down => {
            let vms = Machine::list(dirs);
            if !vms.is_empty() {
                return Err(Error::input(
                    format!("VMs still exist: {}", vms.join(", ")),
                    "`boma-qvm down` them first (or `boma-qvm prune`)",
                ));
            }
            access.down().await?;
            println!("network down");
        }
        NetCmd::Status => {
            println!("{}", access.status().await?);
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct NetdArgs {
    /// The unix socket to listen on (mode 0660, group --group).
    #[arg(long, default_value = net::netd::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The group whose members may use the socket.
    #[arg(long, default_value = net::netd::DEFAULT_GROUP)]
    pub group: String,
    /// The network's bridge.
    #[arg(long, default_value = net::config::DEFAULT_BRIDGE)]
    pub bridge: String,
    /// The network's subnet (the bridge takes .1).
    #[arg(long, default_value = net::config::DEFAULT_SUBNET)]
    pub subnet: String,
    /// Upstream DNS for the VMs while egress is on (repeatable); default: /etc/resolv.conf's.
    #[arg(long = "upstream-dns")]
    pub upstream_dns: Vec<std::net::IpAddr>,
}

/// `boma-qvm netd`: the privileged network daemon, until SIGTERM. Its state: `--state-dir`
/// when typed, else /var/lib/boma-qvm/netd.
pub fn netd(dirs: &Dirs, state_typed: bool, a: NetdArgs) -> Result<()> {
    let state_dir = if state_typed {
        dirs.state.clone()
    } else {
        PathBuf::from(net::netd::DEFAULT_STATE_DIR)
    };
    net::netd::serve(net::netd::Options {
        socket: a.socket,
        state_dir,
        group: a.group,
        config: NetConfig {
            bridge: a.bridge,
            subnet: a.subnet.parse()?,
            upstream_dns: (!a.upstream_dns.is_empty()).then_some(a.upstream_dns),
        },
    })
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Also boot the busybox test guest (no network, built into the cache on first use): print
    /// the time from QEMU start to its READY marker and of a clean reboot, then remove it.
    #[arg(long)]
    pub boot_test: bool,
    /// The boot test's accelerator, resolved as for `up`: auto (KVM only where it really works),
    /// kvm or tcg.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto, requires = "boot_test")]
    pub accel: AccelChoice,
    /// With --accel kvm: try KVM even when the check says it is not usable.
    #[arg(long, requires = "boot_test")]
    pub force_accel: bool,
    /// Seconds each boot-test wait may take (READY, the guest's shutdown, READY again).
    /// Default: 30 under KVM, 150 under TCG.
    #[arg(long, requires = "boot_test")]
    pub boot_timeout: Option<u64>,
}

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

/// Print warnings with their fixes; exit non-zero when there are any. With `--boot-test`, also
/// boot the test guest and print its timings.
pub async fn doctor(dirs: &Dirs, a: DoctorArgs) -> Result<()> {
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
    ] {
        if boma_qvm::tools::find(tool).is_some() {
            println!("ok: {tool}");
        } else {
            problems += 1;
            println!("MISSING: {tool} (install with the integration_test role: `make setup`)");
        }
    }
    problems += check_ansible();
    match NetAccess::choose(dirs) {
        Ok(a @ NetAccess::Netd { .. }) => match a.status().await {
            Ok(_) => println!("ok: the VM network through {}", a.describe()),
            Err(e) => {
                problems += 1;
                println!("UNREACHABLE: {e}");
            }
        },
        Ok(a) => println!("ok: the VM network {}", a.describe()),
        Err(e) => {
            problems += 1;
            println!("NO NETWORK: {e}");
        }
    }
    for w in net::doctor(&Network::saved_config(dirs))? {
        problems += 1;
        println!("WARNING: {}\n  fix: {}", w.problem, w.fix);
    }
    if a.boot_test {
        boot_test(dirs, &a).await?;
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

async fn boot_test(dirs: &Dirs, a: &DoctorArgs) -> Result<()> {
    let (accel, warning) = accel::resolve(a.accel, &KvmProbe::read(), a.force_accel)?;
    if let Some(w) = warning {
        eprintln!("{w}");
    }
    let opts = boottest::Options {
        accel,
        timeout: a
            .boot_timeout
            .map(Duration::from_secs)
            .unwrap_or_else(|| boottest::default_ready_timeout(accel)),
        start: StartOptions::default(),
    };
    println!(
        "boot test: the busybox test guest under {}, no network, 1 vCPU, 256 MiB (each wait up to {} s)",
        accel.as_str(),
        opts.timeout.as_secs()
    );
    let r = boottest::run(dirs, &opts).await?;
    println!(
        "boot test: QEMU start -> READY: {:.1} s",
        r.ready.as_secs_f64()
    );
    println!(
        "boot test: clean reboot (ACPI power button -> guest shutdown path -> reset -> READY): {:.1} s",
        r.reboot.as_secs_f64()
    );
    println!(
        "ok: boot test passed under {}; the guest {} and its VM was removed",
        accel.as_str(),
        if r.clean_shutdown {
            "powered off cleanly"
        } else {
            "did not power off in time (QEMU was stopped)"
        }
    );
    Ok(())
}
