//! `make bench`: the figures issue 13 asks for, measured in one run on this machine, with the
//! default golden image and the accelerator `--accel auto` picks, printed side by side and
//! written to docs/benchmarks.md. Figures live here, never in timed tests; CI does not run it.
//!
//! It runs as root inside a network namespace of its own (it re-executes itself under
//! `ip netns exec`), with a private state directory and the machine's image cache, and boots
//! Debian VMs one at a time (run it under the machine's Debian-VM lock where there is one:
//! `make bench` does). About 14 minutes under TCG here, plus a template build when there is none.
//!
//! What it measures, and how:
//! - up -> SSH and up -> ready (cloud-init done, when the cycle's first Ansible task starts),
//!   cold (`--cold`) and warm (restored from the template), through `Machine::up_staged`.
//! - readiness detection latency: sshd stopped and started again through the guest agent while
//!   a 1 ms prober and `net::wait_for_ssh` (what `up` uses) watch port 22; the difference
//!   between them, five times.
//! - the supervisor's and QEMU's RSS (`/proc/PID/status`).
//! - a clean reboot (`Machine::reboot`: ACPI, shutdown, reset, SSH back) vs the guest's own
//!   `systemctl reboot` over SSH to SSH back with a new boot_id: alternated BOMA_BENCH_REBOOTS
//!   times (default 3; the former bench/reboot-ratio.sh), each after the guest's boot finished
//!   (`systemctl is-system-running --wait`), medians.
//! - reset vs re-apply: `cycle --snapshot --keep` of the bundled example (fixed, so it passes),
//!   its apply stage, then `reset`'s restore stage.
//! - prune of 10 orphaned running busybox VMs (`boma-qvm prune`).

use boma_qvm::cycle::{Kept, kept::RESET_STAGE, report::Report};
use boma_qvm::guest::image::{self, ImageChoice};
use boma_qvm::machine::accel::{self, AccelChoice, KvmProbe};
use boma_qvm::machine::spec::{Boot, VmSpec};
use boma_qvm::machine::{Machine, OsSource, StartOptions, State, UpRequest, warm};
use boma_qvm::paths::Dirs;
use boma_qvm::stage::Stages;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const IN_NS: &str = "BOMA_BENCH_NETNS";
const CLI: &str = env!("CARGO_BIN_EXE_boma-qvm");
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/boma");

fn main() {
    if std::env::var_os(IN_NS).is_none() {
        std::process::exit(outer());
    }
    if let Err(e) = boma_qvm::config_file::load() {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
    // SAFETY: single-threaded here, before any runtime exists.
    unsafe { std::env::set_var("BOMA_QVM_EXE", CLI) };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let code = match rt.block_on(inner()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bench: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// Make a namespace, run this binary inside it, delete the namespace.
fn outer() -> i32 {
    let ns = format!("bq-bench-{}", std::process::id());
    let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
    if !ok(Command::new("ip").args(["netns", "add", &ns])) {
        eprintln!("bench: `ip netns add {ns}` failed (run as root)");
        return 1;
    }
    ok(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
    let me = std::env::current_exe().expect("current exe");
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(&me)
        .env(IN_NS, &ns)
        .status();
    // Anything still in the namespace (a VM's dnsmasq after a failure) goes with it.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ip netns pids {ns} | xargs -r kill -9; ip netns del {ns}"
        ))
        .status();
    status.map(|s| s.code().unwrap_or(1)).unwrap_or(1)
}

type R<T> = Result<T, String>;

fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// A private state directory, pruned and removed on drop.
struct Scratch {
    tmp: tempfile::TempDir,
    dirs: Dirs,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("bqb-{tag}"))
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut dirs = Dirs::under(tmp.path());
        dirs.cache = Dirs::from_env().cache;
        Scratch { tmp, dirs }
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(CLI)
            .args(args)
            .env("BOMA_QVM_STATE_DIR", &self.dirs.state)
            .env("BOMA_QVM_RUNS_DIR", self.tmp.path().join("runs"))
            .output()
            .expect("run boma-qvm")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = self.cli(&["prune"]);
    }
}

fn start_options(max_vms: usize) -> StartOptions {
    StartOptions {
        exe: PathBuf::from(CLI),
        max_vms,
        ..StartOptions::default()
    }
}

fn request(host: &str, cold: bool) -> R<UpRequest> {
    let (accel, _) =
        accel::resolve(AccelChoice::Auto, &KvmProbe::read(), false).map_err(e("accel"))?;
    let mut req = UpRequest::new(host, OsSource::Image(ImageChoice::default()), accel);
    req.cold = cold;
    req.start = start_options(1);
    Ok(req)
}

/// Seconds of the stages named `names` (summed).
fn secs(stages: &Stages, names: &[&str]) -> f64 {
    stages
        .records
        .iter()
        .filter(|r| names.contains(&r.name.as_str()))
        .map(|r| r.seconds)
        .sum()
}

/// Seconds from the first stage after the image (and template) to the end of `last`.
fn up_to(stages: &Stages, last: &str) -> f64 {
    let mut total = 0.0;
    for r in &stages.records {
        if r.name == "golden image" || r.name == "warm template" {
            continue;
        }
        total += r.seconds;
        if r.name == last {
            break;
        }
    }
    total
}

fn rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

fn pids(m: &Machine) -> (i32, i32) {
    match m.state() {
        State::Running { supervisor, qemu } => (supervisor, qemu),
        State::Off => (0, 0),
    }
}

#[derive(Default)]
struct Figures {
    template_built_secs: Option<f64>,
    template_state_mib: u64,
    template_disk_mib: u64,
    template_dir: String,
    cold_ssh: f64,
    cold_ready: f64,
    warm_ssh: f64,
    warm_ready: f64,
    detect_ms: Vec<f64>,
    sup_rss: f64,
    qemu_rss_warm: f64,
    qemu_rss_cold: f64,
    clean_reboot: f64,
    clean_halves: (f64, f64),
    own_reboot: f64,
    reboot_rounds: usize,
    apply: f64,
    reset: f64,
    reset_total: f64,
    prune: f64,
    prune_left: usize,
}

async fn inner() -> R<()> {
    // BOMA_BENCH_ONLY=prune (or debian) runs one part, prints it, and writes nothing.
    let only = std::env::var("BOMA_BENCH_ONLY").ok();
    let part = |p: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == p));
    let mut f = Figures::default();
    let (accel, _) =
        accel::resolve(AccelChoice::Auto, &KvmProbe::read(), false).map_err(e("accel"))?;
    let mut image_name = String::from("-");
    if part("debian") {
        image_name = debian(&mut f).await?;
    }
    if part("prune") {
        eprintln!("== bench: prune of 10 orphaned VMs");
        (f.prune, f.prune_left) = prune_ten().await?;
    }
    let table = render(&f, &image_name, accel.as_str());
    println!("{table}");
    if only.is_none() {
        let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
        std::fs::write(&doc, table).map_err(e("writing docs/benchmarks.md"))?;
        eprintln!("== bench: written to {}", doc.display());
    }
    Ok(())
}

/// Everything on the Debian guest; returns the golden image's name.
async fn debian(f: &mut Figures) -> R<String> {
    let s = Scratch::new("vm");
    let dirs = &s.dirs;
    let golden = image::ensure(dirs, &ImageChoice::default())
        .await
        .map_err(e("golden image"))?;
    eprintln!("== bench: golden image {}", golden.name);

    // The template (built now when there is none: a cold boot + save, reported apart).
    let want = warm::Want::new(&golden, &request("bench", false)?).map_err(e("want"))?;
    if warm::find(dirs, &golden, &want).is_err() {
        eprintln!("== bench: building the warm template first");
        let mut st = Stages::new();
        let m = Machine::up_staged(dirs, &request("bench-tmpl", false)?, &mut st)
            .await
            .map_err(e("template build"))?;
        f.template_built_secs = Some(secs(&st, &["warm template"]));
        m.down().await.map_err(e("down"))?;
    }
    let t =
        warm::find(dirs, &golden, &want).map_err(|w| format!("no template after building: {w}"))?;
    f.template_state_mib = t.manifest.state_bytes >> 20;
    f.template_disk_mib = t.manifest.disk_bytes >> 20;
    f.template_dir = t.dir.display().to_string();

    // Cold.
    eprintln!("== bench: cold up");
    let mut st = Stages::new();
    let m = Machine::up_staged(dirs, &request("bench-cold", true)?, &mut st)
        .await
        .map_err(e("cold up"))?;
    f.cold_ssh = up_to(&st, "ssh");
    f.cold_ready = up_to(&st, "cloud-init");
    f.qemu_rss_cold = rss_mib(pids(&m).1);
    m.down().await.map_err(e("down"))?;

    // Warm.
    eprintln!("== bench: warm up");
    let mut st = Stages::new();
    let m = Machine::up_staged(dirs, &request("bench-warm", false)?, &mut st)
        .await
        .map_err(e("warm up"))?;
    if secs(&st, &["restore"]) == 0.0 {
        return Err(format!("the warm up did not restore: {:?}", st.records));
    }
    f.warm_ssh = up_to(&st, "ssh");
    f.warm_ready = f.warm_ssh;
    let (sup, qemu) = pids(&m);
    f.sup_rss = rss_mib(sup);
    f.qemu_rss_warm = rss_mib(qemu);

    eprintln!("== bench: readiness detection latency");
    for _ in 0..5 {
        f.detect_ms.push(detect_once(&m).await?);
    }

    // Alternated (so a shared machine's load hits both kinds alike), each after the guest has
    // finished booting (so neither interrupts services still starting); medians.
    let rounds: usize = std::env::var("BOMA_BENCH_REBOOTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3)
        .max(1);
    eprintln!("== bench: clean reboot vs the guest's own reboot, alternated, {rounds} each");
    let (mut clean, mut own, mut shut, mut boot) = (vec![], vec![], vec![], vec![]);
    for i in 1..=rounds {
        settle(&m).await;
        let t0 = Instant::now();
        let r = m.reboot().await.map_err(e("clean reboot"))?;
        clean.push(t0.elapsed().as_secs_f64());
        shut.push(r.shutdown_secs);
        boot.push(r.boot_secs);
        settle(&m).await;
        own.push(own_reboot(&m).await?);
        eprintln!(
            "   round {i}: clean {:.1} s (shutdown {:.1} s), guest's own {:.1} s",
            clean[i - 1],
            shut[i - 1],
            own[i - 1]
        );
    }
    f.clean_reboot = median(&mut clean);
    f.clean_halves = (median(&mut shut), median(&mut boot));
    f.own_reboot = median(&mut own);
    f.reboot_rounds = rounds;
    m.down().await.map_err(e("down"))?;

    eprintln!("== bench: cycle --snapshot --keep (fixed example), then reset");
    let out = s.cli(&[
        "cycle",
        "askari",
        "--repo",
        REPO,
        "--snapshot",
        "--keep",
        "-e",
        "docker_host_container_forward=true",
    ]);
    let runs = s.tmp.path().join("runs");
    let report = std::fs::read_dir(&runs)
        .map_err(e("runs"))?
        .flatten()
        .map(|d| d.path().join("report.json"))
        .find(|p| p.exists())
        .ok_or_else(|| format!("no report.json:\n{}", String::from_utf8_lossy(&out.stderr)))?;
    let report: Report =
        serde_json::from_str(&std::fs::read_to_string(&report).map_err(e("report"))?)
            .map_err(e("report.json"))?;
    f.apply = report
        .stages
        .iter()
        .find(|r| r.name == "apply")
        .map(|r| r.seconds)
        .ok_or("no apply stage")?;
    let mut k = Kept::open(dirs, Some("askari")).map_err(e("kept VM"))?;
    let t0 = Instant::now();
    k.reset().await.map_err(e("reset"))?;
    f.reset_total = t0.elapsed().as_secs_f64();
    f.reset = k
        .stages
        .records
        .iter()
        .find(|r| r.name == RESET_STAGE)
        .map(|r| r.seconds)
        .ok_or("no reset stage")?;
    drop(k);
    s.cli(&["down", "askari"]);
    Ok(golden.name)
}

/// sshd stopped, then started through the guest agent while a 1 ms prober and
/// `wait_for_ssh` both watch port 22: how much later than the prober `wait_for_ssh` returns.
async fn detect_once(m: &Machine) -> R<f64> {
    let ip = m.ip().map_err(e("ip"))?;
    let t = Duration::from_secs(120);
    let sh = |cmd: &'static str| async move {
        let out = m
            .agent_exec(&["/bin/sh", "-c", cmd], t)
            .await
            .map_err(e(cmd))?;
        if out.code != Some(0) {
            return Err(format!("{cmd}: {out:?}"));
        }
        Ok::<_, String>(())
    };
    sh("systemctl stop ssh.socket ssh.service 2>/dev/null; systemctl stop ssh").await?;
    let addr = std::net::SocketAddr::from((ip, 22));
    let prober = async {
        loop {
            if let Ok(Ok(mut s)) = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                use tokio::io::AsyncReadExt;
                let mut b = [0u8; 4];
                if s.read_exact(&mut b).await.is_ok() && &b == b"SSH-" {
                    return Instant::now();
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let ours = async {
        boma_qvm::net::wait_for_ssh(ip, t)
            .await
            .map_err(e("wait_for_ssh"))?;
        Ok::<_, String>(Instant::now())
    };
    let start = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sh("systemctl start ssh").await
    };
    let (p, o, s) = tokio::join!(prober, ours, start);
    s?;
    let o = o?;
    Ok(if o >= p {
        (o - p).as_secs_f64() * 1000.0
    } else {
        -((p - o).as_secs_f64() * 1000.0)
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Until the guest's boot has finished (`systemctl is-system-running --wait`; degraded counts).
async fn settle(m: &Machine) {
    let _ = m
        .execute(
            "systemctl is-system-running --wait",
            Duration::from_secs(600),
        )
        .await;
}

/// `sudo systemctl reboot` over SSH until SSH works again with a new boot_id.
async fn own_reboot(m: &Machine) -> R<f64> {
    let id = "cat /proc/sys/kernel/random/boot_id";
    let before = m.succeed(id).await.map_err(e("boot_id"))?;
    let t0 = Instant::now();
    // The connection may drop before ssh returns: not an error.
    let _ = m
        .execute("sudo systemctl reboot", Duration::from_secs(60))
        .await;
    let check = format!("test \"$({id})\" != {}", before.trim());
    m.wait_until_succeeds(&check, Duration::from_secs(900))
        .await
        .map_err(e("SSH back after the guest's own reboot"))?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Ten running busybox VMs whose creator is gone, then `boma-qvm prune`: seconds, and how many
/// QEMU processes survived it.
async fn prune_ten() -> R<(f64, usize)> {
    let s = Scratch::new("prune");
    let g = boma_qvm::guest::testguest::ensure(&s.dirs.cache).map_err(e("test guest"))?;
    let mut vms = Vec::new();
    for i in 0..10 {
        let mut spec = VmSpec::new(
            &format!("boma-it-orphan{i}"),
            boma_qvm::machine::accel::Accel::Tcg,
            Boot::Kernel {
                kernel: g.kernel.clone(),
                initrd: Some(g.initrd.clone()),
                append: "console=ttyS0".into(),
            },
        );
        spec.cpus = 1;
        spec.memory_mib = 192;
        let m = Machine::create(&s.dirs, &spec)
            .map_err(e("create"))?
            .with_start_options(start_options(10));
        m.start().await.map_err(e("start"))?;
        vms.push(m);
    }
    for m in &vms {
        m.expect_console("BOMA-TESTGUEST-READY", Duration::from_secs(300))
            .await
            .map_err(e("busybox READY"))?;
    }
    drop(vms); // orphaned: nothing holds them but their supervisors
    let t0 = Instant::now();
    let out = s.cli(&["prune"]);
    let took = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!("prune: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let left = boma_qvm::machine::procs::find(|argv| {
        argv.first().is_some_and(|a| a.contains("qemu-system"))
            && boma_qvm::machine::procs::mentions(argv, &s.dirs.state)
    })
    .len();
    Ok((took, left))
}

fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = boma_qvm::machine::guard::mem_total_mib().unwrap_or(0) / 1024;
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("PRETTY_NAME="))
                .map(|l| l[13..].trim_matches('"').to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("{os}, {cpu}, {cores} cores, {mem} GiB RAM (load average at the end: {load})")
}

fn render(f: &Figures, image: &str, accel: &str) -> String {
    let mut d = f.detect_ms.clone();
    d.sort_by(|a, b| a.total_cmp(b));
    let med = d.get(d.len() / 2).copied().unwrap_or(f64::NAN);
    let max = d.last().copied().unwrap_or(f64::NAN);
    let rev = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut t = String::new();
    let _ = writeln!(t, "# Benchmarks (`make bench`)\n");
    let _ = writeln!(
        t,
        "Measured by `make bench` (benches/boma.rs) in one run on one machine; figures, not \
         guarantees: they move with the machine's load, and CI never gates on them.\n"
    );
    let _ = writeln!(t, "- machine: {}", machine_line());
    let _ = writeln!(
        t,
        "- accelerator: **{accel}**; QEMU: {}",
        boma_qvm::tools::first_line("qemu-system-x86_64", &["--version"]).unwrap_or_default()
    );
    let _ = writeln!(
        t,
        "- guest: golden image `{image}`, 2 vCPU, 3072 MiB, 20 GiB overlay (the defaults); boma-qvm {rev}, {}",
        boma_qvm::guest::image::tool::utc_now()
    );
    let _ = writeln!(t);
    let _ = writeln!(t, "| what | A | B | A ÷ B | goal |");
    let _ = writeln!(t, "|---|---|---|---|---|");
    let _ = writeln!(
        t,
        "| first Ansible task can start (up -> ready): cold (A) vs warm (B) | {:.1} s | {:.1} s | {:.1}x | warm ≥ 10x sooner |",
        f.cold_ready,
        f.warm_ready,
        f.cold_ready / f.warm_ready
    );
    let _ = writeln!(
        t,
        "| up -> SSH: cold (A) vs warm (B) | {:.1} s | {:.1} s | {:.1}x | warm ≤ 10 s |",
        f.cold_ssh,
        f.warm_ssh,
        f.cold_ssh / f.warm_ssh
    );
    let _ = writeln!(
        t,
        "| reboot -> SSH, median of {} alternated: clean over QMP (A: shutdown {:.1} s + boot {:.1} s) vs the guest's own `systemctl reboot` (B) | {:.1} s | {:.1} s | {:.2} | ≤ 1.1 |",
        f.reboot_rounds,
        f.clean_halves.0,
        f.clean_halves.1,
        f.clean_reboot,
        f.own_reboot,
        f.clean_reboot / f.own_reboot
    );
    let _ = writeln!(
        t,
        "| reset (A: restore the post-apply snapshot, clock stepped) vs re-apply (B: the cycle's apply) | {:.1} s | {:.1} s | {:.3} | ≤ 0.10 |",
        f.reset,
        f.apply,
        f.reset / f.apply
    );
    let _ = writeln!(
        t,
        "| `boma-qvm reset` whole (restore + the real reboot + verify) | {:.1} s | | | |",
        f.reset_total
    );
    let _ = writeln!(
        t,
        "| readiness detection after sshd answers (5 runs: median / max) | {med:.0} ms | {max:.0} ms | | ≤ 100 ms |"
    );
    let _ = writeln!(
        t,
        "| supervisor RSS | {:.1} MiB | | | ≤ 15 MiB |",
        f.sup_rss
    );
    let _ = writeln!(
        t,
        "| QEMU RSS: warm VM at ready (A) vs cold VM at ready (B) | {:.0} MiB | {:.0} MiB | | |",
        f.qemu_rss_warm, f.qemu_rss_cold
    );
    let _ = writeln!(
        t,
        "| prune of 10 orphaned running VMs (busybox guests; QEMU left: {}) | {:.2} s | | | ≤ 2 s |",
        f.prune_left, f.prune
    );
    let _ = writeln!(
        t,
        "| warm template: memory state (A) and disk overlay (B) on disk | {} MiB | {} MiB | | |",
        f.template_state_mib, f.template_disk_mib
    );
    if let Some(b) = f.template_built_secs {
        let _ = writeln!(
            t,
            "| warm template build (cold boot to ready + save), this run | {b:.0} s | | | |"
        );
    }
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "Template: {}. Up -> ready is every stage after the golden image: cold = network, overlay, \
         seed, boot, DHCP lease, SSH, cloud-init done; warm = network, overlay, seed, restore, \
         re-identify, DHCP lease, SSH (cloud-init finished in the template). Readiness detection: \
         how much later than a 1 ms prober `net::wait_for_ssh` sees sshd's banner.",
        f.template_dir
    );
    t
}
