//! Taps: a port of the bridge while an fd is open, gone when the last fd closes; QEMU accepts
//! the fd as `-netdev tap,fd=N` and the tap dies with QEMU (the libvirt way).

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use boma_qvm::Error;
use boma_qvm::net::rtnl::Rtnl;
use boma_qvm::net::{Network, mac_for, open_tap, tap_name_for};
use common::lite::lite;

#[test]
fn tap_is_on_the_bridge_and_vanishes_when_its_fd_closes() {
    let l = lite("t");
    let tap = tap_name_for("boma-it-tap");
    l.ns.block_on(|| async {
        let network = Network::up(&l.dirs, &l.cfg).await.unwrap();
        let rtnl = Rtnl::connect().unwrap();
        let bridge = rtnl.link("boma-qvm0").await.unwrap().unwrap();
        let fd = network.open_tap("boma-it-tap").await.unwrap();
        let link = rtnl
            .link(&tap)
            .await
            .unwrap()
            .expect("tap exists while its fd is open");
        assert_eq!(
            link.controller,
            Some(bridge.index),
            "tap is a port of the bridge"
        );
        assert!(link.up);
        drop(fd);
        let gone = vanishes(&rtnl, &tap).await;
        assert!(gone, "tap {tap} still exists after its fd was closed");

        let e = open_tap(&tap, "no-such-br").await.map(|_| ()).unwrap_err();
        assert!(
            matches!(e, Error::Network { .. })
                && e.to_string().contains("bridge no-such-br does not exist"),
            "{e}"
        );
        assert!(
            rtnl.link(&tap).await.unwrap().is_none(),
            "failed open_tap left a tap behind"
        );
        network.down().await.unwrap();
    });
}

/// The supervisor's way: QEMU gets the tap as fd 3, we close our copy, the tap lives exactly as
/// long as QEMU. (QEMU is started paused, `-S`: no guest runs.)
#[test]
fn qemu_takes_the_tap_fd_and_the_tap_dies_with_qemu() {
    let l = lite("q");
    let tap = tap_name_for("boma-it-qemu");
    let qmp = l._tmp.path().join("qmp.sock");
    l.ns.block_on(|| async {
        let network = Network::up(&l.dirs, &l.cfg).await.unwrap();
        let rtnl = Rtnl::connect().unwrap();
        let fd = network.open_tap("boma-it-qemu").await.unwrap();
        let raw = fd.as_raw_fd();
        let mut cmd = std::process::Command::new("qemu-system-x86_64");
        cmd.args([
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "64",
        ])
        .args(["-netdev", "tap,id=n0,fd=3", "-device"])
        .arg(format!(
            "virtio-net-pci,netdev=n0,mac={}",
            mac_for("boma-it-qemu")
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stderr(std::process::Stdio::piped());
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let r = if raw == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(raw, 3)
                };
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
        }
        let mut qemu = cmd.spawn().unwrap();
        drop(fd); // our copy: from now on QEMU holds the only one
        for _ in 0..200 {
            if qmp.exists() || qemu.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(st) = qemu.try_wait().unwrap() {
            let out = qemu.wait_with_output().unwrap();
            panic!(
                "QEMU refused the tap fd ({st}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(qmp.exists(), "QEMU did not come up");
        let link = rtnl
            .link(&tap)
            .await
            .unwrap()
            .expect("tap lives while QEMU holds it");
        assert!(link.controller.is_some());

        qemu.kill().unwrap();
        qemu.wait().unwrap();
        let gone = vanishes(&rtnl, &tap).await;
        assert!(gone, "tap {tap} outlived QEMU");
        network.down().await.unwrap();
    });
}

/// Whether link `name` disappears within two seconds.
async fn vanishes(rtnl: &Rtnl, name: &str) -> bool {
    for _ in 0..100 {
        if rtnl.link(name).await.unwrap().is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
