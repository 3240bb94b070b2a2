//! boma-qvm: test risky infrastructure changes on a throwaway QEMU VM that mirrors a real host.
//!
//! The crate is a library plus a thin CLI (`src/main.rs`), so tests drive VMs directly.
//! One module per concern; see the README's "Code map".

pub mod ansible;
pub mod config_file;
pub mod cycle;
pub mod error;
pub mod fault;
pub mod guest;
pub mod machine;
pub mod net;
pub mod paths;
pub mod secrets;
pub mod settings;
pub mod stage;
pub mod tools;

pub use error::{Error, Result};
