//! Bringing a VM up end to end: golden image -> overlay -> cloud-init seed -> isolated network ->
//! boot -> DHCP lease -> SSH; and tearing it down again (VM, its network registration, and the
//! network itself once no VM is left on it). Every stage is timed and logged.

use crate::guest::image::{self, ImageChoice};
use crate::machine::accel::Accel;
use crate::machine::events;
use crate::machine::spec::{self, Boot, NicSpec, VmSpec};
use crate::machine::vm::{StartOptions, Vm};
use crate::machine::warm;
use crate::net::access::NetAccess;
use crate::net::{self, NetConfig};
use crate::paths::Dirs;
use crate::stage::Stages;
use crate::{Error, Result, guest::seed, guest::ssh};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the VM boots.
#[derive(Debug, Clone)]
pub enum OsSource {
    /// A golden image (overlay + cloud-init seed + SSH key).
    Image(ImageChoice),
    /// A kernel/initrd with no disk image and no seed (the busybox test guest).
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    },
}

#[derive(Debug, Clone)]
pub struct UpRequest {
    pub host: String,
    pub os: OsSource,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Virtual size of the overlay (the guest grows its root filesystem to it).
    pub disk_gib: u64,
    /// The isolated network, or `None` for a VM without a NIC.
    pub net: Option<NetConfig>,
    pub egress: bool,
    /// Names the VM's DNS answers with the VM's own address (the mirrored host's public names).
    pub dns_names: Vec<String>,
    pub console_patterns: Vec<String>,
    pub tcg_tb_size_mib: Option<u32>,
    /// Why this image (printed and reported); set by whoever chose it.
    pub image_reason: String,
    /// The accelerator fallback's one-line warning, printed once the request is checked.
    pub accel_warning: Option<String>,
    /// Wait for SSH login with the run's key (images only).
    pub wait_ssh: bool,
    /// Boot from scratch even when a warm template could be restored (`--cold`).
    pub cold: bool,
    pub start: StartOptions,
}

impl UpRequest {
    /// The design's defaults: 2 vCPU, 3 GiB, 20 GiB thin overlay, default network with egress.
    pub fn new(host: &str, os: OsSource, accel: Accel) -> Self {
        let wait_ssh = matches!(os, OsSource::Image(_));
        UpRequest {
            host: host.to_string(),
            os,
            accel,
            cpus: spec::DEFAULT_CPUS,
            memory_mib: spec::DEFAULT_MEMORY_MIB,
            disk_gib: spec::DEFAULT_DISK_GIB,
            net: Some(NetConfig::default()),
            egress: true,
            dns_names: Vec::new(),
            console_patterns: Vec::new(),
            tcg_tb_size_mib: None,
            image_reason: String::new(),
            accel_warning: None,
            wait_ssh,
            cold: false,
            start: StartOptions::default(),
        }
    }
}

impl UpRequest {
    /// Everything about the request that can be known before anything is made or booted: the
    /// VM name, the sizes, the slot count, the network's config, the kernel files, a named
    /// image in the cache, and free RAM. Cheap (no process is started); `up` runs it first.
    pub fn check(&self, dirs: &Dirs) -> Result<()> {
        spec::vm_name(&self.host)?;
        spec::check_size(
            self.cpus,
            self.memory_mib,
            self.disk_gib,
            crate::machine::guard::mem_total_mib()?,
        )?;
        if self.start.max_vms == 0 {
            return Err(Error::input(
                "--max-vms 0 allows no VM at all",
                "give --max-vms 1 or more (BOMA_QVM_MAX_VMS); the default is 1",
            ));
        }
        if let Some(net) = &self.net {
            net.validate()?;
        }
        match &self.os {
            OsSource::Kernel { kernel, initrd, .. } => {
                for (what, p) in std::iter::once(("--kernel", kernel))
                    .chain(initrd.iter().map(|i| ("--initrd", i)))
                {
                    if !p.exists() {
                        return Err(Error::not_found(
                            format!("{what} {}", p.display()),
                            format!("give {what} the path of an existing {}", &what[2..]),
                        ));
                    }
                    if !p.is_file() {
                        return Err(Error::input(
                            format!("{what} {} is not a file", p.display()),
                            format!("give {what} the path of an existing {}", &what[2..]),
                        ));
                    }
                }
            }
            OsSource::Image(choice) => choice.check(dirs)?,
        }
        crate::machine::guard::check_memory(
            crate::machine::guard::mem_available_mib()?,
            self.memory_mib as u64,
            self.start.min_free_mib,
        )
    }
}

/// Run `fut`, but fail fast when the VM's console shows a failure or QEMU exits; a failure
/// carries the console tail as evidence.
pub(crate) async fn watched<T>(vm: &Vm, fut: impl Future<Output = Result<T>>) -> Result<T> {
    let r = tokio::select! {
        r = fut => r,
        e = events::first_failure(vm.tail()) => Err(e),
    };
    r.map_err(|e| match e.inner() {
        Error::Timeout { .. } | Error::GuestFailure { .. } | Error::Qemu { .. } => vm.explain(e),
        _ => e,
    })
}

/// Create and boot a VM, returning once it has its lease (and SSH and cloud-init, when asked).
/// A VM from a golden image starts warm when it can (`warm`): restored from the template of its
/// image and shape, which is built first when there is none.
///
/// An infrastructure failure of a cold first boot is retried once with a fresh VM (`cold`).
pub(crate) async fn up(dirs: &Dirs, req: &UpRequest, stages: &mut Stages) -> Result<Vm> {
    req.check(dirs)?;
    if let Some(w) = &req.accel_warning {
        eprintln!("{w}");
    }
    refuse_existing(dirs, &spec::vm_name(&req.host)?, &req.host)?;
    match warm::plan(dirs, req, stages).await? {
        warm::Start::Warm(img, t) => warm::restore(dirs, req, &img, &t, stages).await,
        warm::Start::Cold(image) => {
            let plan = Plan {
                name: spec::vm_name(&req.host)?,
                host: req.host.clone(),
                backing: image.as_ref().map(|i| i.disk.clone()),
                seed: SeedPlan::Fresh,
            };
            Ok(cold(dirs, req, image.as_ref(), &plan, stages).await?.vm)
        }
    }
}

/// A cold boot of the VM `plan` describes, to ready (lease; SSH and cloud-init when asked).
///
/// An infrastructure failure of the first boot is retried once with a fresh VM, saying so and
/// recording the retry in `stages`: under TCG a guest kernel panic (measured: 1 in 8 two-vCPU
/// boots, an Oops in nf_conntrack while Docker starts; a multi-threaded TCG race, not the
/// guest's fault), and under any accelerator no DHCP lease, SSH that never came, cloud-init
/// that never finished, or QEMU dying during the boot. A retry costs a boot (minutes under
/// TCG), so only these are retried: a failure before the boot (image, network, input) would
/// fail again. The failed attempt's console is kept under `<state>/retries/`.
pub(crate) async fn cold(
    dirs: &Dirs,
    req: &UpRequest,
    image: Option<&image::Image>,
    plan: &Plan,
    stages: &mut Stages,
) -> Result<Made> {
    let e = match cold_once(dirs, req, image, plan, stages).await {
        Ok(made) => return Ok(made),
        Err(e) => e,
    };
    let name = &plan.name;
    let Some(why) = retryable(&e, req.accel, dirs.vm(name).exists()) else {
        return Err(e);
    };
    let vm = Vm::open(dirs, name)?;
    let kept = dirs
        .state
        .join("retries")
        .join(format!("{name}-{}.console.log", events::now() as u64));
    std::fs::create_dir_all(kept.parent().expect("has a parent")).ok();
    let kept = std::fs::copy(vm.run.console_log(), &kept)
        .ok()
        .map(|_| kept);
    let first = e.inner().to_string();
    let first = first.lines().next().unwrap_or("");
    tracing::warn!(
        "{name}: {why} during its first boot ({first}); this is an infrastructure failure, not the \
         change under test: retrying once with a fresh VM (the failed console is kept at {})",
        kept.as_ref()
            .map_or("nowhere".into(), |p| p.display().to_string())
    );
    stages.retrying(&format!("{why}: {first}"), kept);
    teardown(vm).await?;
    cold_once(dirs, req, image, plan, stages).await
}

/// Why a first boot's failure `e` is worth one retry, or `None`. `booted`: the VM was made and
/// started (a failure before that is the image's, the network's or the input's).
fn retryable(e: &Error, accel: Accel, booted: bool) -> Option<&'static str> {
    if !booted {
        return None;
    }
    match e.inner() {
        Error::GuestFailure { pattern, .. }
            if accel == Accel::Tcg && pattern.contains("Kernel panic") =>
        {
            Some("the guest kernel panicked (a known TCG emulator race)")
        }
        Error::Timeout { what, .. } if what.contains("lease") => Some("no DHCP lease"),
        Error::Timeout { what, .. } if what.contains("cloud-init") => {
            Some("cloud-init never finished")
        }
        Error::Timeout { .. } => Some("the first SSH login never came"),
        Error::Qemu { .. } => Some("QEMU died"),
        _ => None,
    }
}

async fn cold_once(
    dirs: &Dirs,
    req: &UpRequest,
    image: Option<&image::Image>,
    plan: &Plan,
    stages: &mut Stages,
) -> Result<Made> {
    refuse_existing(dirs, &plan.name, &plan.host)?;
    let made = make(dirs, req, image, plan, stages).await?;
    if let Err(e) = stages.run("boot", made.vm.start(&req.start)).await {
        let _ = teardown(made.vm).await;
        return Err(e);
    }
    wait_ready(req, &made, true, stages).await?;
    Ok(made)
}

/// Refuse a VM name that is taken.
pub(crate) fn refuse_existing(dirs: &Dirs, name: &str, host: &str) -> Result<()> {
    if dirs.vm(name).exists() {
        return Err(Error::AlreadyExists {
            what: format!("VM {name}"),
            fix: format!("remove it with `boma-qvm down {host}` (or keep using it)"),
        });
    }
    Ok(())
}

/// The golden image `choice` names (pulled or built on first use), checked against the disk size.
pub(crate) async fn golden(
    dirs: &Dirs,
    req: &UpRequest,
    choice: &ImageChoice,
    stages: &mut Stages,
) -> Result<image::Image> {
    let img = stages
        .run("golden image", image::ensure(dirs, choice))
        .await?;
    img.check_disk_size(req.disk_gib)?;
    tracing::info!("golden image: {} ({})", img.name, req.image_reason);
    Ok(img)
}

/// How a VM's disk and seed are made.
pub(crate) struct Plan {
    pub name: String,
    /// The inventory host (the seed's hostname).
    pub host: String,
    /// The qcow2 the overlay is backed by (the golden image, or a warm template's disk); `None`
    /// for a kernel boot without a disk.
    pub backing: Option<PathBuf>,
    pub seed: SeedPlan,
}

/// What the cloud-init seed says about the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SeedPlan {
    /// A cold boot: a new instance-id (cloud-init's first boot), the NIC matched by its MAC.
    Fresh,
    /// A warm template's contract: its instance-id (the restored guest is that instance, so
    /// its next boot is not a first boot), the NIC matched by name (the restored guest takes
    /// this VM's MAC when it is re-identified).
    Warm { instance_id: String },
}

/// A VM made (run directory, spec, overlay, seed, network registration), not yet started.
pub(crate) struct Made {
    pub vm: Vm,
    /// How this process reaches the network, and the config it runs with.
    pub network: Option<(NetAccess, NetConfig)>,
    pub vm_net: Option<net::VmNet>,
}

/// The VM's spec for `req` (its NIC, disk and seed are added by `make`).
pub(crate) fn base_spec(req: &UpRequest, name: &str, boot: Boot) -> VmSpec {
    let mut spec = VmSpec::new(name, req.accel, boot);
    spec.host = Some(req.host.clone());
    spec.cpus = req.cpus;
    spec.memory_mib = req.memory_mib;
    spec.console_patterns = req.console_patterns.clone();
    spec.tcg_tb_size_mib = req.tcg_tb_size_mib;
    spec
}

/// Make the VM `plan` describes: network, run directory and spec, overlay, seed, registration.
/// On failure nothing is left (the VM never ran).
pub(crate) async fn make(
    dirs: &Dirs,
    req: &UpRequest,
    image: Option<&image::Image>,
    plan: &Plan,
    stages: &mut Stages,
) -> Result<Made> {
    // How this process reaches the network (netd, or directly as root): decided, and refused
    // with the fix, before anything is made.
    let network = match &req.net {
        Some(cfg) => {
            let access = NetAccess::choose(dirs)?;
            let cfg = stages.run("network", access.up(cfg)).await?;
            Some((access, cfg))
        }
        None => None,
    };
    let boot = match (image, &req.os) {
        (Some(img), _) => img.boot.clone(),
        (
            None,
            OsSource::Kernel {
                kernel,
                initrd,
                append,
            },
        ) => Boot::Kernel {
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            append: append.clone(),
        },
        (None, OsSource::Image(_)) => unreachable!("an image source always resolves an image"),
    };
    let name = &plan.name;
    let mut spec = base_spec(req, name, boot);
    let mac = net::mac_for(name);
    if let Some((access, cfg)) = &network {
        spec.nic = Some(NicSpec {
            mac: mac.to_string(),
            tap: net::tap_name_for(name),
            bridge: cfg.bridge.clone(),
            netd: access.socket().map(Path::to_path_buf),
        });
    }
    let vm = Vm::create(dirs, &spec)?;
    let made = async {
        let vm_net = match &network {
            Some((access, cfg)) => Some(
                access
                    .register(cfg, name, req.dns_names.clone(), req.egress)
                    .await?,
            ),
            None => None,
        };
        if let Some(backing) = &plan.backing {
            // In the run directory: the only place the account QEMU runs as may write.
            let overlay = vm.run.overlay();
            stages
                .run("overlay", async {
                    image::overlay::create(backing, &overlay, Some(req.disk_gib * (1 << 30)))
                })
                .await?;
            let seed_iso = stages
                .run("cloud-init seed", async {
                    write_seed(&vm, &plan.host, vm_net.as_ref(), &plan.seed)
                })
                .await?;
            spec.disk = Some(overlay);
            spec.seed = Some(seed_iso);
            vm.run.write_spec(&spec)?;
        }
        Ok::<Option<net::VmNet>, Error>(vm_net)
    }
    .await;
    let vm_net = match made {
        Ok(v) => v,
        Err(e) => {
            let _ = teardown(vm).await;
            return Err(e);
        }
    };
    Ok(Made {
        vm,
        network,
        vm_net,
    })
}

/// After the VM started: its lease, then (when asked) SSH with the run's key, then (when
/// `cloud_init`) cloud-init done. The VM is kept on failure: its console explains it.
pub(crate) async fn wait_ready(
    req: &UpRequest,
    made: &Made,
    cloud_init: bool,
    stages: &mut Stages,
) -> Result<()> {
    let vm = &made.vm;
    let kept = |e: Error| keep_note(vm, e);
    let ip = match (&made.network, &made.vm_net) {
        (Some((access, _)), Some(v)) => {
            let t = req.accel.scale(Duration::from_secs(60));
            Some(
                stages
                    .run(
                        "dhcp lease",
                        watched(vm, access.wait_lease(&vm.name, &v.mac, t)),
                    )
                    .await
                    .map_err(kept)?,
            )
        }
        _ => None,
    };
    if let (true, Some(ip)) = (req.wait_ssh, ip) {
        let t = req.accel.scale(Duration::from_secs(90));
        let conn = ssh::Conn::new(ip.to_string(), vm.run.ssh_key());
        stages
            .run(
                "ssh",
                watched(vm, async {
                    net::wait_for_ssh(ip, t).await?;
                    ssh::wait_for_login(&conn, t).await
                }),
            )
            .await
            .map_err(kept)?;
        // cloud-init restarts sshd (new host keys) and writes users late in the first boot:
        // the VM is ready when it is done, not when sshd first answers.
        if cloud_init {
            stages
                .run("cloud-init", watched(vm, cloud_init_done(&conn, t)))
                .await
                .map_err(kept)?;
        }
    }
    Ok(())
}

/// Wait for `cloud-init status --wait`: exit 0 is done, 2 is done with recoverable errors
/// (logged), anything else fails with cloud-init's own account.
pub(crate) async fn cloud_init_done(conn: &ssh::Conn, timeout: Duration) -> Result<()> {
    let out = ssh::run_retrying(conn, "cloud-init status --wait --long", timeout, timeout).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match out.status.code() {
        Some(0) => Ok(()),
        Some(2) => {
            tracing::warn!("cloud-init finished with recoverable errors:\n{text}");
            Ok(())
        }
        _ => Err(Error::command(
            "cloud-init status --wait --long",
            out.status.to_string(),
            format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
        )),
    }
}

pub(crate) fn keep_note(vm: &Vm, e: Error) -> Error {
    tracing::warn!(
        "{} is kept for inspection: `boma-qvm console {0} --log`, `boma-qvm status {0}`; remove it with `boma-qvm down {0}`",
        vm.name
    );
    e
}

fn write_seed(
    vm: &Vm,
    host: &str,
    vm_net: Option<&net::VmNet>,
    plan: &SeedPlan,
) -> Result<PathBuf> {
    let key = ssh::keygen(&vm.run.dir)?;
    let s = match plan {
        SeedPlan::Fresh => {
            let instance = format!("{}-{}", vm.name, events::now() as u64);
            let mut s = seed::SeedSpec::new(&instance, host, &key.public_key);
            s.mac = vm_net.map(|v| v.mac.to_string());
            s
        }
        SeedPlan::Warm { instance_id } => seed::SeedSpec::new(instance_id, host, &key.public_key),
    };
    seed::write(&vm.run.dir, &s)
}

/// How the VM reaches its network: the way it was made (its NIC records netd's socket).
pub(crate) fn access_of(dirs: &Dirs, vm: &Vm) -> Result<Option<NetAccess>> {
    Ok(vm
        .spec()?
        .nic
        .map(|nic| NetAccess::recorded(dirs, nic.netd.as_deref())))
}

/// The VM's address on the isolated network (from its registration).
pub(crate) fn vm_ip(dirs: &Dirs, vm: &Vm) -> Result<Ipv4Addr> {
    let no_net = || {
        Error::network(
            format!("{} has no address on the isolated network", vm.name),
            "it was started without a network",
        )
    };
    let access = access_of(dirs, vm)?.ok_or_else(no_net)?;
    access.vm(&vm.name)?.map(|(v, _)| v.ip).ok_or_else(no_net)
}

/// SSH to the VM as `ansible` with the run's key.
pub(crate) fn ssh_conn(dirs: &Dirs, vm: &Vm) -> Result<ssh::Conn> {
    if !vm.run.ssh_key().exists() {
        return Err(Error::not_found(
            format!("an SSH key for {}", vm.name),
            "only VMs booted from an image get a key",
        ));
    }
    Ok(ssh::Conn::new(
        vm_ip(dirs, vm)?.to_string(),
        vm.run.ssh_key(),
    ))
}

/// Power on an existing VM (its network is brought back first if it has a NIC, and the VM
/// registered again if the network went down without it).
pub(crate) async fn start(dirs: &Dirs, vm: &Vm, opts: &StartOptions) -> Result<()> {
    let spec = vm.spec()?;
    if let Some(nic) = &spec.nic {
        let access = NetAccess::recorded(dirs, nic.netd.as_deref());
        let cfg = access.up_again(&nic.bridge).await?;
        if access.vm(&vm.name)?.is_none() {
            access.register(&cfg, &vm.name, Vec::new(), true).await?;
        }
    }
    vm.start(opts).await
}

/// Power on an existing VM from a saved state (its network is brought back first if it has a
/// NIC).
pub(crate) async fn start_restoring(
    dirs: &Dirs,
    vm: &Vm,
    opts: &StartOptions,
    state: &std::path::Path,
) -> Result<()> {
    if let Some(nic) = &vm.spec()?.nic {
        let access = NetAccess::recorded(dirs, nic.netd.as_deref());
        let cfg = access.up_again(&nic.bridge).await?;
        if access.vm(&vm.name)?.is_none() {
            access.register(&cfg, &vm.name, Vec::new(), true).await?;
        }
    }
    vm.start_restoring(opts, state).await
}

/// Destroy the VM and its network registration; take the network down when it was the last VM.
pub(crate) async fn teardown(vm: Vm) -> Result<()> {
    let dirs = vm.dirs.clone();
    let name = vm.name.clone();
    // Without a readable spec, whether it had a NIC is unknown: its network registration says.
    let spec = vm.spec().ok();
    let nic = spec.as_ref().map(|s| s.nic.clone());
    vm.destroy().await?;
    match nic {
        Some(None) => {}
        Some(Some(n)) => {
            NetAccess::recorded(&dirs, n.netd.as_deref())
                .release(&name, true)
                .await?;
        }
        None => {
            NetAccess::recorded(&dirs, None)
                .release(&name, false)
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_infrastructure_failures_after_the_boot_are_retried() {
        let lease = Error::timeout("a DHCP lease for 52:54:00:aa:bb:cc", 300, "");
        assert_eq!(retryable(&lease, Accel::Kvm, true), Some("no DHCP lease"));
        assert_eq!(retryable(&lease, Accel::Kvm, false), None, "not booted");
        let ssh = Error::timeout("`true` over ssh as ansible@192.168.231.5:22", 450, "")
            .with_evidence("console tail", "...");
        assert_eq!(
            retryable(&ssh, Accel::Tcg, true),
            Some("the first SSH login never came")
        );
        let panic = Error::GuestFailure {
            pattern: "Kernel panic - not syncing".into(),
            detail: String::new(),
            fix: String::new(),
        };
        assert!(retryable(&panic, Accel::Tcg, true).is_some());
        assert_eq!(retryable(&panic, Accel::Kvm, true), None);
        let qemu = Error::qemu("QEMU exited while waiting (exit 1)", "");
        assert_eq!(retryable(&qemu, Accel::Tcg, true), Some("QEMU died"));
        for e in [
            Error::command("cloud-init status --wait --long", "exit status: 1", "error"),
            Error::input("x", "y"),
            Error::image("build failed", "z"),
        ] {
            assert_eq!(retryable(&e, Accel::Tcg, true), None, "{e}");
        }
    }
}
