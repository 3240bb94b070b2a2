//! boma-qvm: test risky infrastructure changes on a throwaway QEMU VM that mirrors a real host.
//!
//! The crate is a library plus a thin CLI (`src/main.rs`), so tests drive VMs directly.
//! One module per concern; see the README's "Code map".

pub mod accel;
pub mod ansible;
pub mod boottest;
pub mod config_file;
pub mod console;
pub mod cycle;
pub mod error;
pub mod events;
pub mod fault;
pub mod guard;
pub mod image;
pub mod net;
pub mod paths;
pub mod power;
pub mod procs;
pub mod provision;
pub mod prune;
pub mod qemu;
pub mod qga;
pub mod qmp;
pub mod rundir;
pub mod seed;
pub mod spec;
pub mod ssh;
pub mod stage;
pub mod supervisor;
pub mod testguest;
pub mod tools;
pub mod vm;

pub use error::{Error, Result};
