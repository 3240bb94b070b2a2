//! Support for the fault-injection tests: one VM at a time per test binary, test guests with a
//! qcow2 disk, the guest's command service (TCP 7000), and booting on the isolated network
//! inside the test world's namespace.

#![allow(dead_code)]

use super::{BOOT, Env, READY, start_options, test_guest};
use boma_qvm::machine::accel::Accel;
use boma_qvm::machine::{Machine, OsSource, UpRequest};
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Generous: TCG on a shared 2-core machine.
pub const T: Duration = Duration::from_secs(120);

/// Held for a whole test: the fault tests boot one VM at a time (CPU is scarce), also when a
/// runner such as nextest runs tests in parallel processes. A file lock in the cache dir.
pub struct OneVm(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

pub fn one_vm_at_a_time() -> OneVm {
    let dir = boma_qvm::paths::Dirs::from_env().cache;
    std::fs::create_dir_all(&dir).unwrap();
    // A fault test takes a minute or two; nextest kills any test after 15.
    OneVm(super::lock_or_panic(
        &dir.join("fault-tests.lock"),
        Duration::from_secs(600),
    ))
}

/// Create a test guest with a fresh qcow2 disk of `mib` MiB (its /dev/vda), start it and wait
/// for READY (the cursors are past it).
pub async fn boot_with_disk(env: &Env, host: &str, append: &str, mib: u64) -> Machine {
    let mut spec = env.guest_spec(host, append);
    // The run directory's overlay path, so the disk goes when the VM does.
    let disk = boma_qvm::machine::rundir::RunDir::new(env.dirs.vm(&spec.name)).overlay();
    spec.disk = Some(disk.clone());
    let m = Machine::create(&env.dirs, &spec)
        .unwrap()
        .with_start_options(start_options());
    super::netns::sh_ok(&format!(
        "qemu-img create -q -f qcow2 {} {mib}M",
        disk.display()
    ));
    m.start().await.unwrap();
    m.expect_console(READY, T).await.unwrap();
    m
}

/// Boot a test guest without a disk.
pub async fn boot(env: &Env, host: &str, append: &str) -> Machine {
    env.boot(host, append).await
}

/// A kernel-boot test guest on the isolated network (`boma.net=1` plus `append`), 1 vCPU,
/// 256 MiB, waiting for its lease. Run inside the test world's host namespace.
pub fn net_guest_request(host: &str, append: &str, cfg: &boma_qvm::net::NetConfig) -> UpRequest {
    let (kernel, initrd) = test_guest();
    let os = OsSource::Kernel {
        kernel,
        initrd: Some(initrd),
        append: format!("console=ttyS0 boma.net=1 {append}")
            .trim()
            .to_string(),
    };
    let mut req = UpRequest::new(host, os, Accel::Tcg);
    req.cpus = 1;
    req.memory_mib = 256;
    req.net = Some(cfg.clone());
    req.wait_ssh = false;
    req.start = start_options();
    req
}

/// How often the guest has booted (its BOOT marker on the console).
pub fn boots(t: &Machine) -> usize {
    t.console_count(BOOT)
}

/// Run `cmd` in the test guest through its command service on TCP 7000: connect (bounded by
/// `timeout`), send the command, read the output until the guest's shell exits.
pub async fn guest_cmd(ip: Ipv4Addr, cmd: &str, timeout: Duration) -> Result<String, String> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect((ip, 7000))
            .await
            .map_err(|e| format!("connect {ip}:7000: {e}"))?;
        s.write_all(format!("{cmd}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.shutdown().await.map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        Ok(out)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {ip}:7000 within {timeout:?}")))
}

/// Names of the events (QMP's and ours), FAULT records as `FAULT:<kind>`.
pub fn timeline(t: &Machine) -> Vec<String> {
    t.events()
        .unwrap()
        .into_iter()
        .map(|r| match r.data["kind"].as_str() {
            Some(k) if r.is("FAULT") => format!("FAULT:{k}"),
            _ => r.event,
        })
        .collect()
}

/// Panics unless `names` occur in `tl` in this order (other events may come between).
pub fn assert_in_order(tl: &[String], names: &[&str]) {
    let mut at = 0;
    for n in names {
        match tl[at..].iter().position(|e| e == n) {
            Some(p) => at += p + 1,
            None => panic!("{n} not found after position {at} in {tl:?} (want {names:?} in order)"),
        }
    }
}
