//! The resource guard: refuse to start a VM below a free-RAM threshold, and at most N VMs at a
//! time (default one). The slot is an flock held by the VM's supervisor, so a crashed run never
//! leaves a stale lock behind.

use crate::error::IoContext;
use crate::paths::Dirs;
use crate::{Error, Result};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;

/// Headroom on top of the guest's RAM: QEMU itself and, under TCG, its translation cache.
pub const HEADROOM_MIB: u64 = 1024;

/// `MemAvailable` from /proc/meminfo, in MiB.
pub fn mem_available_mib() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ctx(|| "reading /proc/meminfo".into())?;
    parse_mem_available(&text).ok_or_else(|| {
        Error::guard(
            "/proc/meminfo has no MemAvailable line",
            "run on Linux 3.14 or newer with /proc mounted",
        )
    })
}

/// `MemTotal` from /proc/meminfo, in MiB: no guest can be larger than the host.
pub fn mem_total_mib() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ctx(|| "reading /proc/meminfo".into())?;
    meminfo_mib(&text, "MemTotal:").ok_or_else(|| {
        Error::guard(
            "/proc/meminfo has no MemTotal line",
            "run on Linux with /proc mounted",
        )
    })
}

pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo_mib(meminfo, "MemAvailable:")
}

fn meminfo_mib(meminfo: &str, key: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The threshold for a guest of `guest_mib`: explicit, else guest + headroom.
pub fn threshold_mib(guest_mib: u64, explicit: Option<u64>) -> u64 {
    explicit.unwrap_or(guest_mib + HEADROOM_MIB)
}

/// Refuse when less than the threshold is available, giving the numbers.
pub fn check_memory(available_mib: u64, guest_mib: u64, explicit: Option<u64>) -> Result<()> {
    let need = threshold_mib(guest_mib, explicit);
    if available_mib >= need {
        return Ok(());
    }
    let why = match explicit {
        Some(_) => "the configured minimum (--min-free-mib / BOMA_QVM_MIN_FREE_MIB)".to_string(),
        None => format!("guest {guest_mib} MiB + {HEADROOM_MIB} MiB headroom for QEMU"),
    };
    Err(Error::guard(
        format!("{available_mib} MiB of RAM available, {need} MiB needed ({why})"),
        "stop other VMs or programs, give the VM less --memory, or lower the threshold",
    ))
}

/// A held VM slot: an open file with an exclusive flock. The lock belongs to the open file
/// description, so a supervisor that inherited the fd keeps the slot after this handle is
/// dropped (closing our copy does not unlock), and the slot frees itself when the last holder
/// exits, however it exits.
pub struct Slot {
    pub lock: std::fs::File,
    pub index: usize,
}

fn try_lock(file: &std::fs::File) -> bool {
    // SAFETY: flock on a valid open fd.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Take one of `max` slots for VM `name`, or say which VMs hold them.
pub fn acquire_slot(dirs: &Dirs, max: usize, name: &str) -> Result<Slot> {
    let dir = dirs.state.join("slots");
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let mut holders = Vec::new();
    for index in 0..max.max(1) {
        let path = dir.join(format!("slot-{index}.lock"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx(|| format!("opening {}", path.display()))?;
        let mut lock = file;
        if try_lock(&lock) {
            lock.set_len(0).ctx(|| "truncating slot".into())?;
            lock.rewind().ctx(|| "rewinding slot".into())?;
            lock.write_all(name.as_bytes())
                .ctx(|| "writing slot".into())?;
            return Ok(Slot { lock, index });
        }
        let mut holder = String::new();
        let _ = lock.read_to_string(&mut holder);
        holders.push(holder);
    }
    Err(Error::AlreadyExists {
        what: format!("a running VM ({}; at most {max} at a time)", holders.join(", ")),
        fix: "stop it first (`boma-qvm down NAME` or `boma-qvm shutdown NAME`), or raise --max-vms / BOMA_QVM_MAX_VMS".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parsing() {
        let m = "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   4194304 kB\n";
        assert_eq!(parse_mem_available(m), Some(4096));
        assert_eq!(parse_mem_available("MemTotal: 1 kB"), None);
    }

    #[test]
    fn memory_guard_gives_the_numbers() {
        assert!(check_memory(8192, 3072, None).is_ok());
        let e = check_memory(2000, 3072, None).unwrap_err();
        assert_eq!(e.exit_code(), 6);
        let msg = e.to_string();
        assert!(
            msg.contains("2000 MiB") && msg.contains("4096 MiB"),
            "{msg}"
        );
        assert!(check_memory(2000, 256, Some(1000)).is_ok());
        assert!(check_memory(2000, 256, Some(3000)).is_err());
    }

    #[test]
    fn a_slot_stays_held_by_an_inheriting_process_after_our_handle_drops() {
        let d = tempfile::tempdir().unwrap();
        let dirs = Dirs::under(d.path());
        let slot = acquire_slot(&dirs, 1, "boma-it-a").unwrap();
        let held_elsewhere = slot.lock.try_clone().unwrap(); // stands in for the supervisor's copy
        drop(slot);
        assert!(
            acquire_slot(&dirs, 1, "boma-it-b").is_err(),
            "dropping our handle must not unlock"
        );
        drop(held_elsewhere);
        assert!(acquire_slot(&dirs, 1, "boma-it-b").is_ok());
    }

    #[test]
    fn slots_are_exclusive_and_name_their_holder() {
        let d = tempfile::tempdir().unwrap();
        let dirs = Dirs::under(d.path());
        let held = acquire_slot(&dirs, 1, "boma-it-a").unwrap();
        let e = acquire_slot(&dirs, 1, "boma-it-b").err().unwrap();
        assert!(e.to_string().contains("boma-it-a"), "{e}");
        assert!(acquire_slot(&dirs, 2, "boma-it-b").is_ok());
        drop(held);
        assert!(acquire_slot(&dirs, 1, "boma-it-c").is_ok());
    }
}
