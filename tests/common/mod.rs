//! Shared test support: the busybox test guest (tests/guest/build.sh, run by
//! `boma_qvm::testguest` and cached outside the repo), a per-test state directory that is pruned
//! on drop (also when the test panics), and the CLI under test.
#![allow(dead_code)]

pub mod faults;
pub mod http;
pub mod lite;
pub mod netns;
pub mod world;

use boma_qvm::accel::Accel;
use boma_qvm::paths::Dirs;
use boma_qvm::spec::{Boot, VmSpec};
use boma_qvm::vm::{StartOptions, Vm};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const READY: &str = "BOMA-TESTGUEST-READY";
pub const BOOT: &str = "BOMA-TESTGUEST-BOOT";

/// The test guest's kernel and initrd, built once per machine into the XDG cache, in a
/// directory named after a hash of its sources: worktrees with different guests never rebuild
/// over each other. The same builder `doctor --boot-test` uses (the sources embedded in the
/// library, see `boma_qvm::testguest`).
pub fn test_guest() -> (PathBuf, PathBuf) {
    let g = boma_qvm::testguest::ensure(&Dirs::from_env().cache)
        .unwrap_or_else(|e| panic!("building the test guest failed: {e}"));
    (g.kernel, g.initrd)
}

/// A throwaway state dir under /tmp (short, for unix socket paths). Dropping it prunes every VM
/// it holds and removes it, also when the test panicked.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub dirs: Dirs,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("bq")
            .tempdir_in("/tmp")
            .unwrap();
        let mut dirs = Dirs::under(tmp.path());
        dirs.cache = Dirs::from_env().cache;
        Env { tmp, dirs }
    }

    /// The CLI, pointed at this env's state dir.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_boma-qvm"));
        c.env("BOMA_QVM_STATE_DIR", &self.dirs.state)
            .env("BOMA_QVM_CACHE_DIR", &self.dirs.cache);
        c
    }

    /// A test-guest VM spec: 1 vCPU is plenty for busybox and leaves the other core to the host.
    pub fn guest_spec(&self, host: &str, extra_append: &str) -> VmSpec {
        let (kernel, initrd) = test_guest();
        let append = format!("console=ttyS0 {extra_append}").trim().to_string();
        let mut spec = VmSpec::new(
            &format!("boma-it-{host}"),
            Accel::Tcg,
            Boot::Kernel {
                kernel,
                initrd: Some(initrd),
                append,
            },
        );
        spec.cpus = 1;
        spec.memory_mib = 256;
        spec
    }

    /// Create and start a test guest, and wait for its READY marker.
    pub async fn boot(&self, host: &str, extra_append: &str) -> Vm {
        let vm = Vm::create(&self.dirs, &self.guest_spec(host, extra_append)).unwrap();
        vm.start(&start_options()).await.unwrap();
        vm.wait_console(READY, 1, Duration::from_secs(120))
            .await
            .unwrap();
        vm
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let dirs = self.dirs.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(boma_qvm::prune::prune(&dirs))
        })
        .join();
    }
}

pub fn start_options() -> StartOptions {
    StartOptions {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_boma-qvm")),
        min_free_mib: None,
        max_vms: 1,
        timeout: Duration::from_secs(60),
    }
}

/// QEMU processes whose argv mentions `dir`.
pub fn qemus_under(dir: &Path) -> Vec<i32> {
    boma_qvm::procs::find(|argv| {
        argv.first().is_some_and(|a| a.contains("qemu-system"))
            && boma_qvm::procs::mentions(argv, dir)
    })
}

pub fn event_names(vm: &Vm) -> Vec<String> {
    vm.events().unwrap().into_iter().map(|r| r.event).collect()
}
