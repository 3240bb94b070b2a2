//! Per-VM taps, created the way libvirt does it: a NON-persistent tap from `/dev/net/tun`
//! (TUNSETIFF), attached to the bridge over netlink, handed to QEMU as an open fd
//! (`-netdev tap,fd=N`). The tap exists only while an fd to it is open, so it vanishes with QEMU.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use rtnetlink::packet_route::link::InfoKind;

use super::config::validate_ifname;
use super::rtnl::Rtnl;
use crate::{Error, Result};

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);

/// Create tap `tap_name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), make it a port of `bridge` and
/// bring it up. Returns the tap's fd and ifindex. `Network::open_tap` is the way in for callers:
/// it checks the bridge is its own and records the tap.
///
/// The fd is close-on-exec: the caller passes it to QEMU explicitly (clear `FD_CLOEXEC` or
/// `dup2` it in the child), gives QEMU `-netdev tap,fd=N` (QEMU detects the vnet header itself)
/// and then closes its own copy, so the tap disappears when QEMU exits.
pub async fn open_tap(tap_name: &str, bridge: &str) -> Result<(OwnedFd, u32)> {
    validate_ifname(tap_name, "tap")?;
    let rtnl = Rtnl::connect()?;
    let br = rtnl
        .link(bridge)
        .await?
        .filter(|l| l.kind == Some(InfoKind::Bridge))
        .ok_or_else(|| {
            Error::network(
                format!("bridge {bridge} does not exist"),
                "bring the network up first (`boma-qvm net up`)",
            )
        })?;
    let fd = create(tap_name)?;
    let tap = rtnl.link(tap_name).await?.ok_or_else(|| {
        Error::network(
            format!("tap {tap_name} vanished right after creation"),
            "retry; check `dmesg` for tun errors",
        )
    })?;
    rtnl.enslave_up(tap.index, br.index).await?;
    tracing::debug!(
        "tap {tap_name} (ifindex {}) attached to {bridge}",
        tap.index
    );
    Ok((fd, tap.index))
}

fn create(tap_name: &str) -> Result<OwnedFd> {
    let fd = open(
        "/dev/net/tun",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        Error::network(
            format!("cannot open /dev/net/tun: {e}"),
            "load the tun module (`modprobe tun`) and run boma-qvm as root",
        )
    })?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(tap_name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: fd is an open /dev/net/tun, req a valid ifreq that outlives the call.
    unsafe { tun_set_iff(fd.as_raw_fd(), &req) }.map_err(|e| {
        let fix = if e == nix::errno::Errno::EBUSY {
            "another process holds a tap of that name (a running VM?); stop it or run `boma-qvm prune`"
        } else {
            "run boma-qvm as root (CAP_NET_ADMIN) and check that the name is not taken by another device"
        };
        Error::network(format!("TUNSETIFF for tap {tap_name}: {e}"), fix)
    })?;
    Ok(fd)
}
