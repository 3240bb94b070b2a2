//! The guest layer: what runs inside the VM and how we reach it. Golden images (build, pull,
//! import, overlays), the cloud-init NoCloud seed, and SSH with the run's key.

pub mod image;
pub mod seed;
pub mod ssh;
pub mod testguest;
