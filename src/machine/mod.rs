//! The machine layer: one VM and the processes behind it. QEMU's argv, the detached supervisor
//! that owns QEMU and records every QMP event, the QMP and guest-agent channels, the serial
//! console, power (reboot, shutdown), the per-VM run directory and spec, the resource guard,
//! and bringing a VM up and down.

pub mod accel;
mod access;
pub mod boottest;
pub mod console;
pub mod events;
pub mod guard;
mod handle;
pub mod power;
pub mod procs;
pub(crate) mod provision;
pub mod prune;
pub mod qemu;
pub mod qga;
pub mod qmp;
pub mod rundir;
pub mod spec;
pub mod state;
pub mod supervisor;
pub(crate) mod vm;
pub mod warm;
mod watch;

pub use access::{BootDone, LOCKOUT_GRACE, SshState};
pub use handle::{Machine, Rebooted};
pub use power::ShutdownOutcome;
pub use provision::{OsSource, UpRequest};
pub use state::SavedState;
pub use vm::{StartOptions, State, supervisor_exe};
