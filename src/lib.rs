//! boma-qvm: test risky infrastructure changes on a throwaway QEMU VM that mirrors a real host.
//!
//! The crate is a library plus a thin CLI (`src/main.rs`), so tests drive VMs directly.
//! One module per concern; see the README's "Code map".

pub mod accel;
pub mod console;
pub mod error;
pub mod events;
pub mod fault;
pub mod guard;
pub mod net;
pub mod paths;
pub mod power;
pub mod procs;
pub mod provision;
pub mod prune;
pub mod qemu;
pub mod qmp;
pub mod rundir;
pub mod spec;
pub mod stage;
pub mod supervisor;
pub mod vm;

pub use error::{Error, Result};
pub mod image;
pub mod seed;
pub mod ssh;
