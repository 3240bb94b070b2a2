//! The QEMU process: its argv (`argv`, pure) and launching it (`process`).

pub mod argv;
