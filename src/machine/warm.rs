//! Warm starts: a golden image booted once to ready (cloud-init done, sshd up), its memory and
//! device state saved, and every later VM of the same shape restored from it in seconds instead
//! of a cold boot of minutes (TCG), then re-identified as an instance of its own before anything
//! else touches it.
//!
//! A **template** lives beside its golden image, one directory per fingerprint:
//! `<images>/<golden>/warm/<fingerprint>/`:
//! - `disk.qcow2`: the template VM's overlay (backed by the golden disk) at the instant of the
//!   save, read-only; each warm VM's overlay is backed by it, so its disk matches the memory.
//! - `state.bin`: the memory and device state (`Machine::save_state`).
//! - `warm.json`: the manifest: what the template was made from (golden sha256, QEMU version,
//!   machine type, accelerator, vCPUs, memory, disk size, NIC model, the seed contract, QEMU's
//!   argv for its devices), and what it costs.
//! - `template-key`: the template's own SSH key (it opens no restored VM: re-identification
//!   replaces it with the run's key; tests use it to prove that).
//!
//! The fingerprint is a hash of everything a restore depends on ([`Want`]); anything that
//! changes it (a new golden image, a QEMU update, another size, a device added to the argv)
//! means another template: the first run of that shape says so in one line, boots cold to build
//! it, and restores from it. Older templates of the same shape that no VM uses are removed.
//!
//! **The seed contract** (what the template's cloud-init instance is): the NoCloud seed on
//! /dev/vdb, the template's instance-id (every warm VM's seed carries it, so the guest's next
//! boot, the cycle's real reboot, is not a cloud-init first boot), user `ansible` with
//! passwordless sudo, DHCP on the NIC matched by name `en*` with the MAC as client id. Each warm
//! VM's seed has its own host name and SSH key, which cloud-init reads at the next boot.
//!
//! **Re-identification**, through the guest agent (no network needed), before the lease and SSH:
//! the clock stepped to the host's; a fresh random seed (the kernel already reseeded from the
//! new VM generation ID); the host name; this run's SSH key the only authorised one; cloud-init's
//! cached datasource dropped (the next boot reads this run's seed); the NIC takes this VM's own
//! MAC and renews its lease, so it gets this VM's pinned address (two warm VMs never share one).
//! Shared with the template and not changed: the machine-id and the SSH host keys.

use crate::error::IoContext;
use crate::guest::image::{self, Image};
use crate::machine::provision::{self, Made, Plan, SeedPlan, UpRequest};
use crate::machine::qemu::argv;
use crate::machine::rundir::RunDir;
use crate::machine::spec::{self, NicSpec};
use crate::machine::vm::Vm;
use crate::machine::{qga, state};
use crate::stage::Stages;
use crate::{Error, Result, error::show, paths::Dirs};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Directory of an image's templates, inside the image's directory.
pub const DIR: &str = "warm";
pub const MANIFEST: &str = "warm.json";
pub const STATE: &str = "state.bin";
pub const DISK: &str = "disk.qcow2";
pub const KEY: &str = "template-key";
/// The host name of the VM a template is built in (`boma-it-warm-template`).
pub const TEMPLATE_HOST: &str = "warm-template";
/// Bumped when the contract changes (the seed, what re-identification relies on).
const CONTRACT_VERSION: u32 = 1;
/// The package that makes re-identification possible.
const AGENT_PACKAGE: &str = "qemu-guest-agent";

/// What a template's guest is, as cloud-init sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedContract {
    pub version: u32,
    pub datasource: String,
    pub user: String,
    pub network: String,
}

impl SeedContract {
    pub fn current() -> Self {
        SeedContract {
            version: CONTRACT_VERSION,
            datasource: "NoCloud: a cidata ISO on /dev/vdb; the template's instance-id".into(),
            user: crate::guest::ssh::USER.into(),
            network: "dhcp4 on the NIC matched by name en*, client id = MAC".into(),
        }
    }
}

/// Everything a restore depends on. Equal `Want`s restore into each other; the fingerprint
/// (a hash of it) names the template's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    pub golden: String,
    pub golden_sha256: String,
    /// `qemu-system-x86_64 --version`'s first line.
    pub qemu: String,
    pub machine: String,
    pub accel: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u64,
    pub nic: String,
    pub seed: SeedContract,
    /// QEMU's argv for this machine with per-VM paths, names and MAC normalised: a device
    /// added, removed or changed in `qemu/argv.rs` is a different machine.
    pub argv: Vec<String>,
}

impl Want {
    /// What a VM for `req` on `img` needs of a template.
    pub fn new(img: &Image, req: &UpRequest) -> Result<Want> {
        let mut spec = provision::base_spec(req, &spec::vm_name(TEMPLATE_HOST)?, img.boot.clone());
        // Neither changes the guest-visible machine.
        spec.tcg_tb_size_mib = None;
        spec.console_patterns.clear();
        spec.host = None;
        spec.disk = Some("/warm/disk.qcow2".into());
        spec.seed = Some("/warm/seed.iso".into());
        spec.nic = Some(NicSpec {
            mac: "52:54:00:00:00:00".into(),
            tap: "tap".into(),
            bridge: "bridge".into(),
            netd: None,
        });
        // With `-sandbox` (main's seccomp policy) in it: a QEMU that may not do what the
        // template's did is another machine. Not the account QEMU runs as: the saved state
        // holds nothing of it, and the template's files are opened by boma-qvm and handed over.
        let argv = argv::build(
            &spec,
            &RunDir::new("/warm"),
            Some(3),
            &argv::Handed::default(),
        );
        let machine = argv
            .windows(2)
            .find(|w| w[0] == "-machine")
            .map(|w| w[1].clone())
            .unwrap_or_default();
        Ok(Want {
            golden: img.name.clone(),
            golden_sha256: img.manifest.disk_sha256.clone(),
            qemu: qemu_version(&spec.qemu_binary())?,
            machine,
            accel: req.accel.as_str().into(),
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            disk_gib: req.disk_gib,
            nic: "virtio-net-pci".into(),
            seed: SeedContract::current(),
            argv,
        })
    }

    /// The first 16 hex digits of a SHA-256 over the whole `Want`.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(self).expect("serialises");
        hex::encode(Sha256::digest(&json))[..16].to_string()
    }

    /// `tcg, 2 vCPU, 3072 MiB, 20 GiB`.
    pub fn shape(&self) -> String {
        format!(
            "{}, {} vCPU, {} MiB, {} GiB",
            self.accel, self.cpus, self.memory_mib, self.disk_gib
        )
    }

    fn same_shape(&self, o: &Want) -> bool {
        (&self.accel, self.cpus, self.memory_mib, self.disk_gib)
            == (&o.accel, o.cpus, o.memory_mib, o.disk_gib)
    }
}

/// What differs between the template `had` and what is wanted now, one phrase each.
pub fn differences(had: &Want, want: &Want) -> Vec<String> {
    let mut d = Vec::new();
    let mut diff = |what: &str, a: &str, b: &str| {
        if a != b {
            d.push(format!("{what} `{a}` -> `{b}`"));
        }
    };
    diff("golden image", &had.golden, &want.golden);
    diff(
        "golden sha256",
        &had.golden_sha256[..had.golden_sha256.len().min(12)],
        &want.golden_sha256[..want.golden_sha256.len().min(12)],
    );
    diff("QEMU", &had.qemu, &want.qemu);
    diff("machine type", &had.machine, &want.machine);
    diff("accelerator", &had.accel, &want.accel);
    diff("vCPUs", &had.cpus.to_string(), &want.cpus.to_string());
    diff(
        "memory MiB",
        &had.memory_mib.to_string(),
        &want.memory_mib.to_string(),
    );
    diff(
        "disk GiB",
        &had.disk_gib.to_string(),
        &want.disk_gib.to_string(),
    );
    diff("NIC", &had.nic, &want.nic);
    if had.seed != want.seed {
        d.push(format!(
            "seed contract v{} -> v{}",
            had.seed.version, want.seed.version
        ));
    }
    if had.argv != want.argv {
        let gone: Vec<&String> = had.argv.iter().filter(|a| !want.argv.contains(a)).collect();
        let new: Vec<&String> = want.argv.iter().filter(|a| !had.argv.contains(a)).collect();
        d.push(format!(
            "QEMU devices changed (gone: {gone:?}; new: {new:?})"
        ));
    }
    d
}

/// `warm.json`: the [`Want`] a template was made for, plus what it is and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateManifest {
    pub want: Want,
    pub fingerprint: String,
    /// The instance-id in the template's seed (and in every warm VM's seed).
    pub instance_id: String,
    /// The template VM's MAC: the restored guest's NIC has it until re-identification.
    pub mac: String,
    /// The template's own public key (authorised in the template only).
    pub ssh_pubkey: String,
    pub created: String,
    /// The memory and device state file.
    pub state_bytes: u64,
    /// Allocated bytes of the template's overlay (what the first boot wrote).
    pub disk_bytes: u64,
    /// Cold boot of the template VM to ready (lease, SSH, cloud-init done).
    pub boot_secs: f64,
    pub save_secs: f64,
}

/// A template on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub dir: PathBuf,
    pub manifest: TemplateManifest,
}

impl Template {
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK)
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE)
    }
    /// The template's private SSH key.
    pub fn key(&self) -> PathBuf {
        self.dir.join(KEY)
    }

    /// Refuse a template another user could have written (its state is the memory of the VM
    /// this run would start): the same rule as for the golden image it lives beside.
    pub fn check_trust(&self) -> Result<()> {
        let what = format!("the warm template {}", show(&self.dir));
        image::trust::check(&self.dir, &what)?;
        for f in [
            self.dir.join(MANIFEST),
            self.disk(),
            self.state(),
            self.key(),
        ] {
            image::trust::check(&f, &what)?;
        }
        Ok(())
    }

    /// The template in `dir`, complete (manifest, disk, state, key) or an error saying what is
    /// missing.
    pub fn load(dir: &Path) -> std::result::Result<Template, String> {
        let text = std::fs::read_to_string(dir.join(MANIFEST))
            .map_err(|e| format!("{} is unreadable ({e})", show(&dir.join(MANIFEST))))?;
        let manifest: TemplateManifest = serde_json::from_str(&text)
            .map_err(|e| format!("{} does not parse ({e})", show(&dir.join(MANIFEST))))?;
        let t = Template {
            dir: dir.to_path_buf(),
            manifest,
        };
        for f in [t.disk(), t.state(), t.key()] {
            if !f.is_file() {
                return Err(format!("{} is missing", show(&f)));
            }
        }
        Ok(t)
    }
}

/// Where this user's templates of `img` live: beside the image (`<image>/warm`) when this user
/// may write there (root; a user with a cache of their own); else in this user's state
/// directory (`<state>/warm/<image>`): an operator on the shared cache (root:kvm 2750) reads
/// the golden image but cannot add to it, so their first warm start builds a template of
/// their own there, backed by the shared golden image.
pub fn dir_of(dirs: &Dirs, img: &Image) -> PathBuf {
    let writable = |d: &Path| crate::paths::unusable(d, true).is_none();
    choose_dir(&img.dir, &dirs.state, &img.name, writable)
}

fn choose_dir(
    image_dir: &Path,
    state: &Path,
    image_name: &str,
    writable: impl Fn(&Path) -> bool,
) -> PathBuf {
    let beside = image_dir.join(DIR);
    let usable = if beside.is_dir() {
        writable(&beside)
    } else {
        writable(image_dir)
    };
    if usable {
        beside
    } else {
        state.join(DIR).join(image_name)
    }
}

/// Every complete template of `img` this user uses.
pub fn list(dirs: &Dirs, img: &Image) -> Vec<Template> {
    let mut out: Vec<Template> = std::fs::read_dir(dir_of(dirs, img))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Template::load(&e.path()).ok())
        .collect();
    out.sort_by(|a, b| a.manifest.created.cmp(&b.manifest.created));
    out
}

/// The template for `want`, or why there is none (one line, for the log).
pub fn find(dirs: &Dirs, img: &Image, want: &Want) -> std::result::Result<Template, String> {
    let dir = dir_of(dirs, img).join(want.fingerprint());
    let found = if dir.exists() {
        Some(Template::load(&dir))
    } else {
        None
    };
    match found {
        Some(Ok(t)) if t.manifest.want == *want => Ok(t),
        Some(Ok(t)) => Err(format!(
            "the warm template in {} does not match ({})",
            show(&dir),
            differences(&t.manifest.want, want).join("; ")
        )),
        Some(Err(why)) => Err(format!("the warm template is incomplete: {why}")),
        None => {
            let had = list(dirs, img)
                .into_iter()
                .rev()
                .find(|t| t.manifest.want.same_shape(want));
            match had {
                Some(t) => Err(format!(
                    "the warm template for {} ({}) does not match: {}",
                    img.name,
                    want.shape(),
                    differences(&t.manifest.want, want).join("; ")
                )),
                None => Err(format!(
                    "no warm template yet for {} ({})",
                    img.name,
                    want.shape()
                )),
            }
        }
    }
}

/// How `up` starts a VM for `req`.
pub(crate) enum Start {
    /// Restore from this template.
    Warm(Image, Box<Template>),
    /// Boot from scratch (the image, when there is one, is resolved already).
    Cold(Option<Image>),
}

/// Decide warm or cold for `req`, building the template first when there is none that matches
/// (its cold boot is this run's cold boot: saying so in one line). A kernel boot (no golden
/// image) is always cold, silently; an image VM is cold with `--cold`, without a network, or
/// when the image has no guest agent, and the log says why.
pub(crate) async fn plan(dirs: &Dirs, req: &UpRequest, stages: &mut Stages) -> Result<Start> {
    let crate::machine::OsSource::Image(choice) = &req.os else {
        return Ok(Start::Cold(None));
    };
    let img = provision::golden(dirs, req, choice, stages).await?;
    let cold = |why: String| {
        tracing::info!("cold boot: {why}");
        Ok(Start::Cold(Some(img.clone())))
    };
    if req.cold {
        return cold("--cold".into());
    }
    if req.net.is_none() {
        return cold(
            "no network (--no-net): a warm start renews the restored guest's lease".into(),
        );
    }
    if !img.manifest.packages.contains_key(AGENT_PACKAGE) {
        return cold(format!(
            "image `{}` has no {AGENT_PACKAGE} recorded in its manifest, and a restored guest is re-identified through it",
            img.name
        ));
    }
    let want = Want::new(&img, req)?;
    let template = match find(dirs, &img, &want) {
        Ok(t) => {
            t.check_trust()?;
            t
        }
        Err(why) => {
            tracing::warn!("{why}: cold boot to build it, then a warm start from it");
            let t = stages
                .run("warm template", build(dirs, req, &img, &want))
                .await?;
            return Ok(Start::Warm(img, Box::new(t)));
        }
    };
    Ok(Start::Warm(img, Box::new(template)))
}

/// An flock on `<image>/warm/.lock`: shared while a VM's overlay is made on a template,
/// exclusive while a template is built or old ones are removed.
fn lock(dir: PathBuf, exclusive: bool) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    image::trust::create_dir(&dir)?;
    image::trust::check(&dir, "the warm templates' directory")?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ctx(|| format!("opening {}", show(&path)))?;
    let arg = if exclusive {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockShared
    };
    Flock::lock(file, arg).map_err(|(_, e)| {
        Error::image(
            format!("cannot lock {}: {e}", show(&path)),
            "check the cache directory is writable",
        )
    })
}

/// Build the template for `want`: a cold boot of `boma-it-warm-template` to ready, its state
/// saved, its overlay kept read-only. Waits for another process building one (and uses theirs
/// when it matches).
async fn build(dirs: &Dirs, req: &UpRequest, img: &Image, want: &Want) -> Result<Template> {
    let wdir = dir_of(dirs, img);
    let held = {
        let wdir = wdir.clone();
        tokio::task::spawn_blocking(move || lock(wdir, true))
            .await
            .expect("lock task")?
    };
    if let Ok(t) = find(dirs, img, want) {
        tracing::info!(
            "another boma-qvm built the warm template meanwhile: {}",
            show(&t.dir)
        );
        return Ok(t);
    }
    clean_stale(&wdir);
    let staging = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(&wdir)
        .ctx(|| format!("creating a staging directory in {}", show(&wdir)))?;
    let fingerprint = want.fingerprint();
    let instance_id = format!("boma-warm-{fingerprint}");
    let mut treq = req.clone();
    treq.host = TEMPLATE_HOST.into();
    treq.dns_names.clear();
    treq.wait_ssh = true;
    let name = spec::vm_name(TEMPLATE_HOST)?;
    let plan = Plan {
        name: name.clone(),
        host: TEMPLATE_HOST.into(),
        backing: Some(img.disk.clone()),
        seed: SeedPlan::Warm {
            instance_id: instance_id.clone(),
        },
    };
    let t0 = Instant::now();
    let mut tstages = Stages::new();
    let made = match provision::cold(dirs, &treq, Some(img), &plan, &mut tstages).await {
        Ok(m) => m,
        Err(e) => return Err(give_up(dirs, &name, e).await),
    };
    let boot_secs = t0.elapsed().as_secs_f64();
    let saved = match state::save(&made.vm, &staging.path().join(STATE)).await {
        Ok(s) => s,
        Err(e) => return Err(give_up(dirs, &name, e).await),
    };
    let key = made.vm.run.ssh_key();
    let pubkey = std::fs::read_to_string(key.with_extension("pub"))
        .ctx(|| format!("reading {}.pub", show(&key)))?;
    std::fs::copy(&key, staging.path().join(KEY)).ctx(|| "copying the template's key".into())?;
    let mac = made
        .vm_net
        .as_ref()
        .map(|v| v.mac.to_string())
        .unwrap_or_default();
    // The overlay as it was at the save becomes the template's disk. It was made in the run
    // directory (the only place QEMU's account may write) and is that account's: moved while
    // QEMU is paused after the migration (its block layer inactive: it writes nothing more),
    // then this user's, so the cache's trust rule holds.
    if let Err(e) = take_disk(&made.vm.run.overlay(), &staging.path().join(DISK)) {
        return Err(give_up(dirs, &name, e).await);
    }
    provision::teardown(made.vm).await?;

    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let disk = staging.path().join(DISK);
    let disk_bytes = std::fs::metadata(&disk)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    for f in [&disk, &staging.path().join(STATE)] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o444))
            .ctx(|| format!("chmod 444 {}", show(f)))?;
    }
    let manifest = TemplateManifest {
        want: want.clone(),
        fingerprint: fingerprint.clone(),
        instance_id,
        mac,
        ssh_pubkey: pubkey.trim().into(),
        created: image::tool::utc_now(),
        state_bytes: saved.bytes,
        disk_bytes,
        boot_secs,
        save_secs: saved.secs,
    };
    let text = serde_json::to_string_pretty(&manifest).expect("serialises") + "\n";
    std::fs::write(staging.path().join(MANIFEST), text).ctx(|| "writing warm.json".into())?;
    std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o755))
        .ctx(|| format!("chmod {}", show(staging.path())))?;
    let target = wdir.join(&fingerprint);
    if target.exists() {
        // An incomplete or mismatching leftover of this fingerprint.
        if let Some(user) = in_use(dirs, &target.join(DISK)) {
            return Err(Error::image(
                format!(
                    "{} is in use by {user} and cannot be replaced",
                    show(&target)
                ),
                format!("remove that VM (`boma-qvm down {user}`), then run again"),
            ));
        }
        std::fs::remove_dir_all(&target).ctx(|| format!("removing {}", show(&target)))?;
    }
    let kept = staging.keep();
    std::fs::rename(&kept, &target)
        .ctx(|| format!("renaming {} to {}", show(&kept), show(&target)))?;
    let t = Template::load(&target)
        .map_err(|why| Error::image(format!("the new warm template: {why}"), "run again"))?;
    remove_old(dirs, img, &t);
    drop(held);
    tracing::info!(
        "warm template built in {:.0}s (cold boot to ready {:.0}s, state saved in {:.1}s): {} MiB of state, {} MiB of disk, in {}",
        t0.elapsed().as_secs_f64(),
        boot_secs,
        saved.secs,
        t.manifest.state_bytes >> 20,
        t.manifest.disk_bytes >> 20,
        show(&t.dir)
    );
    Ok(t)
}

/// Move the template VM's overlay `from` (its run directory) to `to` (the staging directory),
/// copying when they are on different filesystems, and make it this user's.
fn take_disk(from: &Path, to: &Path) -> Result<()> {
    if std::fs::rename(from, to).is_err() {
        std::fs::copy(from, to).ctx(|| format!("copying {} to {}", show(from), show(to)))?;
        let _ = std::fs::remove_file(from);
    }
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    nix::unistd::chown(to, Some(uid), Some(gid)).map_err(|e| Error::Io {
        context: format!("chown {}", show(to)),
        source: e.into(),
    })
}

/// The template VM failed: keep its console beside the state dir's panics, remove it, and say
/// where the console went.
async fn give_up(dirs: &Dirs, name: &str, e: Error) -> Error {
    let Ok(vm) = Vm::open(dirs, name) else {
        return e;
    };
    let kept = dirs.state.join("panics").join(format!(
        "{name}-{}.console.log",
        crate::machine::events::now() as u64
    ));
    std::fs::create_dir_all(kept.parent().expect("has a parent")).ok();
    std::fs::copy(vm.run.console_log(), &kept).ok();
    let _ = provision::teardown(vm).await;
    e.with_fix(format!(
        "building the warm template failed; its console is kept at {}. `--cold` boots without one",
        show(&kept)
    ))
}

/// Remove stale staging directories (only called with the exclusive lock held).
fn clean_stale(wdir: &Path) {
    for e in std::fs::read_dir(wdir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            tracing::info!("removing stale staging directory {}", show(&e.path()));
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Which VM (in this state directory) or QEMU process uses `disk` as a backing file, if any.
pub fn in_use(dirs: &Dirs, disk: &Path) -> Option<String> {
    let disk = std::fs::canonicalize(disk).unwrap_or(disk.to_path_buf());
    for vm in std::fs::read_dir(dirs.vms())
        .into_iter()
        .flatten()
        .flatten()
    {
        let overlay = RunDir::new(vm.path()).overlay();
        if overlay.exists()
            && image::overlay::info(&overlay)
                .is_ok_and(|i| i.backing.as_deref() == Some(disk.as_path()))
        {
            return Some(vm.file_name().to_string_lossy().into_owned());
        }
    }
    // VMs of other state directories: a running QEMU holds its backing files open.
    let open =
        crate::machine::procs::find(|argv| argv.first().is_some_and(|a| a.contains("qemu-system")))
            .into_iter()
            .find(|pid| {
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == disk))
            });
    open.map(|pid| format!("QEMU pid {pid}"))
}

/// Remove the other templates of `keep`'s shape that nothing uses (the ones it replaces).
fn remove_old(dirs: &Dirs, img: &Image, keep: &Template) {
    for t in list(dirs, img) {
        if t.dir == keep.dir || !t.manifest.want.same_shape(&keep.manifest.want) {
            continue;
        }
        match in_use(dirs, &t.disk()) {
            Some(user) => tracing::info!(
                "keeping the old warm template {} while {user} uses it",
                show(&t.dir)
            ),
            None => {
                tracing::info!("removing the old warm template {}", show(&t.dir));
                let _ = std::fs::remove_dir_all(&t.dir);
            }
        }
    }
}

/// Start a VM for `req` from `template`: its own overlay on the template's disk, a seed with
/// the template's instance-id and this run's host name and key, the saved state restored, the
/// guest re-identified, then its lease and SSH.
pub(crate) async fn restore(
    dirs: &Dirs,
    req: &UpRequest,
    img: &Image,
    template: &Template,
    stages: &mut Stages,
) -> Result<Vm> {
    let name = spec::vm_name(&req.host)?;
    provision::refuse_existing(dirs, &name, &req.host)?;
    let plan = Plan {
        name,
        host: req.host.clone(),
        backing: Some(template.disk()),
        seed: SeedPlan::Warm {
            instance_id: template.manifest.instance_id.clone(),
        },
    };
    let made = {
        // No template is removed while this VM's overlay is being made on it.
        let held = {
            let wdir = dir_of(dirs, img);
            tokio::task::spawn_blocking(move || lock(wdir, false))
                .await
                .expect("lock task")?
        };
        let made = provision::make(dirs, req, Some(img), &plan, stages).await?;
        drop(held);
        made
    };
    tracing::info!(
        "{}: warm start from {} ({} MiB of state)",
        made.vm.name,
        show(&template.dir),
        template.manifest.state_bytes >> 20
    );
    if let Err(e) = stages
        .run(
            "restore",
            made.vm.start_restoring(&req.start, &template.state()),
        )
        .await
    {
        let _ = provision::teardown(made.vm).await;
        return Err(e);
    }
    let t = req.accel.scale(Duration::from_secs(60));
    stages
        .run(
            "re-identify",
            provision::watched(&made.vm, reidentify(&made, req, template, t)),
        )
        .await
        .map_err(|e| provision::keep_note(&made.vm, e))?;
    provision::wait_ready(req, &made, false, stages).await?;
    Ok(made.vm)
}

/// The re-identification script, run as root by the guest agent (`/bin/sh`, dash):
/// `sh -c SCRIPT reidentify NOW NEW_MAC OLD_MAC HOST USER KEY_LINE OLD_KEY_LINE RANDOM RANDOM2`.
/// Every program a restored guest runs first is translated afresh by TCG (the translation cache
/// is not in the saved state), so this uses shell builtins wherever it can: four programs run
/// (date, ip, networkctl, rm).
const REIDENTIFY: &str = r#"set -eu
now=$1 new_mac=$2 old_mac=$3 host=$4 user=$5 key=$6 old_key=$7 rnd=$8 rnd2=$9
# The clock: it stopped when the template was saved.
date -u -s "@$now" > /dev/null
# This run's key is the only one: the user's file holds it alone; root's entry (cloud-init's
# disable_root forced command) names it instead of the template's.
eval "home=~$user"
printf '%s\n' "$key" > "$home/.ssh/authorized_keys"
old_body=${old_key#* }; old_body=${old_body%% *}
new_body=${key#* }; new_body=${new_body%% *}
if [ -f /root/.ssh/authorized_keys ]; then
  out=
  while IFS= read -r line || [ -n "$line" ]; do
    case $line in *"$old_body"*) line="${line%%"$old_body"*}$new_body${line#*"$old_body"}" ;; esac
    out="$out$line
"
  done < /root/.ssh/authorized_keys
  printf '%s' "$out" > /root/.ssh/authorized_keys
fi
# This VM's MAC on the NIC, and a lease for it.
dev=
for d in /sys/class/net/*; do
  read -r a < "$d/address" || continue
  if [ "$a" = "$old_mac" ]; then dev=${d##*/}; fi
done
[ -n "$dev" ] || { echo "no NIC has the template's MAC $old_mac" >&2; exit 3; }
ip link set dev "$dev" address "$new_mac"
networkctl reconfigure "$dev"
# Fresh randomness from the host (the kernel already reseeded on the new VM generation ID),
# and a fresh seed file for the next boot.
printf "$rnd" > /dev/urandom
if [ -e /var/lib/systemd/random-seed ]; then printf "$rnd2" > /var/lib/systemd/random-seed; fi
printf '%s' "$host" > /proc/sys/kernel/hostname
printf '%s\n' "$host" > /etc/hostname
out=
while IFS= read -r line || [ -n "$line" ]; do
  case $line in "127.0.1.1 "*|"127.0.1.1	"*) line="127.0.1.1 $host $host" ;; esac
  out="$out$line
"
done < /etc/hosts
printf '%s' "$out" > /etc/hosts
# The next boot (the cycle's reboot) reads this run's seed again: same instance, this host.
rm -f /var/lib/cloud/instance/obj.pkl
echo "re-identified as $host on $dev ($new_mac)"
"#;

/// `n` bytes of the host's randomness as octal escapes for the guest shell's `printf`.
fn random_escapes(n: usize) -> Result<String> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .ctx(|| "reading /dev/urandom".into())?;
    Ok(b.iter().map(|x| format!("\\{x:03o}")).collect())
}

/// Make the restored guest this run's own instance, through the guest agent (see the module
/// docs for what changes and what stays).
async fn reidentify(made: &Made, req: &UpRequest, template: &Template, t: Duration) -> Result<()> {
    let vm = &made.vm;
    let key = std::fs::read_to_string(vm.run.ssh_key().with_extension("pub"))
        .ctx(|| format!("reading {}.pub", show(&vm.run.ssh_key())))?;
    let mac = made
        .vm_net
        .as_ref()
        .map(|v| v.mac.to_string())
        .ok_or_else(|| {
            Error::network(
                format!("{} has no NIC", vm.name),
                "warm starts need the network",
            )
        })?;
    let (rnd, rnd2) = (random_escapes(256)?, random_escapes(512)?);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let now = format!("{}.{:09}", now.as_secs(), now.subsec_nanos());
    let argv = [
        "/bin/sh",
        "-c",
        REIDENTIFY,
        "reidentify",
        &now,
        &mac,
        &template.manifest.mac,
        &req.host,
        crate::guest::ssh::USER,
        key.trim(),
        &template.manifest.ssh_pubkey,
        &rnd,
        &rnd2,
    ];
    let out = qga::exec(&vm.run.qga_sock(), &argv, t).await?;
    if out.code != Some(0) {
        return Err(Error::command(
            format!(
                "re-identifying the restored guest (through the guest agent of {})",
                vm.name
            ),
            format!("exit {:?}", out.code),
            format!("{}{}", out.stdout, out.stderr),
        ));
    }
    tracing::info!("{}: {}", vm.name, out.stdout.trim());
    Ok(())
}

/// `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
fn qemu_version(binary: &Path) -> Result<String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| {
            Error::missing_tool(
                binary.display().to_string(),
                format!("install QEMU (apt-get install qemu-system-x86) ({e})"),
            )
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want() -> Want {
        Want {
            golden: "debian-13-built".into(),
            golden_sha256: "de58dd6fdd3bc7f6175e9ee1d42920cf".into(),
            qemu: "QEMU emulator version 7.2.22".into(),
            machine: "q35".into(),
            accel: "tcg".into(),
            cpus: 2,
            memory_mib: 3072,
            disk_gib: 20,
            nic: "virtio-net-pci".into(),
            seed: SeedContract::current(),
            argv: vec!["-device".into(), "virtio-rng-pci".into()],
        }
    }

    #[test]
    fn the_fingerprint_changes_with_anything_a_restore_depends_on() {
        let base = want();
        let changes: [fn(&mut Want); 8] = [
            |w| w.golden_sha256 = "00".into(),
            |w| w.qemu = "QEMU emulator version 7.2.23".into(),
            |w| w.accel = "kvm".into(),
            |w| w.cpus = 1,
            |w| w.memory_mib = 2048,
            |w| w.disk_gib = 30,
            |w| w.seed.version += 1,
            |w| w.argv.push("-device".into()),
        ];
        for f in changes {
            let mut w = base.clone();
            f(&mut w);
            assert_ne!(w.fingerprint(), base.fingerprint(), "{w:?}");
            assert_eq!(
                differences(&base, &w).len(),
                1,
                "{:?}",
                differences(&base, &w)
            );
        }
        assert_eq!(base.fingerprint(), want().fingerprint());
        assert!(differences(&base, &want()).is_empty());
    }

    fn image(dir: &Path) -> Image {
        Image {
            name: "debian-13-built".into(),
            dir: dir.to_path_buf(),
            disk: dir.join("disk.qcow2"),
            boot: crate::machine::spec::Boot::Disk,
            manifest: image::Manifest {
                name: "debian-13-built".into(),
                source: image::Source::Import { from: "x".into() },
                created: "2026-01-01T00:00:00Z".into(),
                disk_sha256: want().golden_sha256,
                disk_bytes: 1,
                boot: image::BootSpec::Disk,
                packages: Default::default(),
                stages: vec![],
                files: vec![],
            },
        }
    }

    /// Put a complete template made for `w` into `img`'s warm directory.
    fn install(dirs: &Dirs, img: &Image, w: &Want) -> PathBuf {
        let dir = dir_of(dirs, img).join(w.fingerprint());
        std::fs::create_dir_all(&dir).unwrap();
        for f in [DISK, STATE, KEY] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let m = TemplateManifest {
            want: w.clone(),
            fingerprint: w.fingerprint(),
            instance_id: format!("boma-warm-{}", w.fingerprint()),
            mac: "52:54:00:00:00:01".into(),
            ssh_pubkey: "ssh-ed25519 AAAA t".into(),
            created: image::tool::utc_now(),
            state_bytes: 1,
            disk_bytes: 1,
            boot_secs: 1.0,
            save_secs: 1.0,
        };
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
        dir
    }

    #[test]
    fn find_uses_the_matching_template_and_says_why_there_is_none() {
        let d = tempfile::tempdir().unwrap();
        let dirs = &Dirs::under(&d.path().join("home"));
        let img = image(d.path());
        let w = want();
        let none = find(dirs, &img, &w).unwrap_err();
        assert_eq!(
            none,
            "no warm template yet for debian-13-built (tcg, 2 vCPU, 3072 MiB, 20 GiB)"
        );

        let mut old = w.clone();
        old.qemu = "QEMU emulator version 7.2.21".into();
        install(dirs, &img, &old);
        let why = find(dirs, &img, &w).unwrap_err();
        assert!(
            why.starts_with("the warm template for debian-13-built (tcg, 2 vCPU, 3072 MiB, 20 GiB) does not match: QEMU")
                && why.contains("7.2.21") && why.contains("7.2.22"),
            "{why}"
        );
        let mut other = w.clone();
        other.memory_mib = 2048;
        install(dirs, &img, &other);
        assert!(find(dirs, &img, &w).is_err(), "another shape is no match");

        let dir = install(dirs, &img, &w);
        assert_eq!(find(dirs, &img, &w).unwrap().dir, dir);
        std::fs::remove_file(dir.join(STATE)).unwrap();
        let why = find(dirs, &img, &w).unwrap_err();
        assert!(
            why.contains("incomplete") && why.contains("state.bin"),
            "{why}"
        );
    }

    #[test]
    fn a_template_another_user_could_have_written_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dirs = &Dirs::under(&d.path().join("home"));
        let img = image(d.path());
        let t = Template::load(&install(dirs, &img, &want())).unwrap();
        t.check_trust().unwrap();
        std::fs::set_permissions(t.state(), std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = t.check_trust().unwrap_err().to_string();
        assert!(
            e.contains("state.bin") && e.contains("writable by every user"),
            "{e}"
        );
    }

    /// Beside the image when this user may write there; an operator on the shared cache (which
    /// only root writes) gets templates of their own in their state directory.
    #[test]
    fn templates_live_beside_the_image_unless_this_user_cannot_write_there() {
        let d = tempfile::tempdir().unwrap();
        let (img, state) = (
            d.path().join("images/debian-13-built"),
            d.path().join("state"),
        );
        let own = state.join("warm/debian-13-built");
        let choose = |w: &dyn Fn(&Path) -> bool| choose_dir(&img, &state, "debian-13-built", w);
        assert_eq!(choose(&|_| true), img.join("warm"));
        assert_eq!(choose(&|_| false), own);
        // No warm directory yet: whether the image's directory is writable decides.
        assert_eq!(choose(&|p| p == img), img.join("warm"));
        // Once there is one, it decides (root made it; the operator may not write in it).
        std::fs::create_dir_all(img.join("warm")).unwrap();
        assert_eq!(choose(&|p| p == img), own);
        assert_eq!(choose(&|p| p == img.join("warm")), img.join("warm"));
    }

    #[test]
    fn differences_say_what_changed() {
        let mut w = want();
        w.qemu = "QEMU emulator version 7.2.23".into();
        w.argv.push("pvpanic".into());
        let d = differences(&want(), &w).join("; ");
        assert!(
            d.contains("QEMU `QEMU emulator version 7.2.22` -> `QEMU emulator version 7.2.23`"),
            "{d}"
        );
        assert!(d.contains("new: [\"pvpanic\"]"), "{d}");
    }
}
