//! End to end on a real Debian 13 guest, one guest for every assertion (TCG boots are minutes):
//! the offline-built golden image (built once into the XDG cache, reused after), started warm
//! from its template (built by the first Debian test that needs it: a cold boot to cloud-init
//! done) and proven a distinct instance (this run's key, host name, MAC, address, clock, RNG;
//! the template's key refused; seen failing when re-identification appended this run's key
//! instead of replacing the template's), a cloud-init seed with a per-run key, the isolated
//! network inside a namespace this test creates, SSH with the generated key, the guest agent;
//! then where a real OS is the point for faults: SSH across link loss, a power cut in the middle
//! of fsynced writes to its ext4 root (journal recovery at the next boot, the root read-write
//! again), and disk errors that also reach data still in the golden image behind the overlay — and the golden image byte-for-byte unchanged afterwards.
//! A guest agent reply nobody reads does not hold up the next clean reboot.
//! The real reboot of a Debian guest after an apply is the acceptance test's.

mod common;

use boma_qvm::guest::image::{self, ImageChoice};
use boma_qvm::machine::events::names;
use boma_qvm::machine::{Machine, warm};
use common::faults::*;
use common::netns::Netns;
use common::{Env, Run, start_options};
use std::time::{Duration, Instant};

/// One SSH command.
const S: Duration = Duration::from_secs(90);
/// A Debian boot to SSH under TCG on a busy 2-core machine.
const BOOT: Duration = Duration::from_secs(600);

/// A 4 KiB block of the VM's disk whose data is in the golden image, not in the overlay.
fn block_only_in_the_backing(vm: &Machine) -> u64 {
    let overlay = vm.spec().unwrap().disk.unwrap();
    let map = common::netns::sh_ok(&format!(
        "qemu-img map -U --output=json {}",
        overlay.display()
    ));
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let e = extents
        .iter()
        .find(|e| e["depth"] == 1 && e["data"] == true && e["length"].as_u64() >= Some(1 << 20))
        .expect("the golden image has data the overlay does not");
    e["start"].as_u64().unwrap() / 4096 + 16
}

/// `cmd` over SSH, retried while SSH itself fails (sshd restarts while cloud-init finishes).
async fn ssh_retry(vm: &Machine, cmd: &str) -> String {
    vm.wait_until_succeeds(cmd, S).await.unwrap()
}

fn sha256(path: &std::path::Path) -> String {
    boma_qvm::guest::image::tool::sha256_file(path).unwrap()
}

const HOST_KEYS: &str = "cat /etc/ssh/ssh_host_*_key.pub | sort";

/// The VM was restored from the warm template, and re-identified as an instance of its own: the
/// template's key opens nothing, this run's does; its own host name, MAC and address; its clock
/// within 2 s of the host's; its kernel RNG reseeded on the new VM generation ID. Returns its
/// SSH host keys (to compare after its next boot).
fn distinct_warm_instance(env: &Env, ns: &Netns, vm: &Machine) -> String {
    let restored = vm
        .events()
        .unwrap()
        .into_iter()
        .find(|r| r.is(names::RESTORED))
        .expect("a warm start: the VM was restored from the template");
    let state = std::path::PathBuf::from(restored.data["from"].as_str().unwrap());
    let template = warm::Template::load(state.parent().unwrap()).unwrap();
    let ip = vm.ip().unwrap();
    let ssh = |key: &std::path::Path, user: &str, cmd: &str| {
        let mut c = boma_qvm::guest::ssh::Conn::new(ip.to_string(), key);
        c.user = user.into();
        ns.block_on(|| async { boma_qvm::guest::ssh::run(&c, cmd, S).await.unwrap() })
    };
    let run_key = vm.run_dir().join("id_ed25519");
    assert!(ssh(&run_key, "ansible", "true").status.success());
    for user in ["ansible", "root"] {
        let out = ssh(&template.key(), user, "true");
        assert_eq!(
            out.status.code(),
            Some(255),
            "the template's key must open nothing ({user}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    }
    let sh = |cmd: &str| env.cli_in(ns).ok(&["ssh", "e2e", "--", cmd]);
    assert_eq!(sh("hostname").trim(), "e2e");
    assert!(sh("cat /etc/hosts").contains("127.0.1.1 e2e"));
    let mac = vm.spec().unwrap().nic.unwrap().mac;
    assert_ne!(mac, template.manifest.mac);
    // (Its permanent address and `enx` altname, read at the template's boot, stay the
    // template's until the next boot.)
    let link = sh("ip -o link show | grep -i ' link/ether '");
    assert!(
        link.contains(&format!("link/ether {mac} ")),
        "the NIC has this VM's MAC {mac}: {link}"
    );
    assert!(
        !link.contains(&format!("link/ether {} ", template.manifest.mac)),
        "{link}"
    );
    let addrs = sh("ip -o -4 addr show scope global | grep -v docker");
    assert_eq!(
        addrs.lines().count(),
        1,
        "one address, the template's is gone: {addrs}"
    );
    assert!(addrs.contains(&format!("inet {ip}/")), "{addrs}");
    assert!(
        sh("sudo dmesg").contains("crng reseeded due to virtual machine fork"),
        "the kernel RNG was reseeded on the new VM generation ID"
    );
    let instance = sh("cat /var/lib/cloud/data/instance-id");
    assert_eq!(instance.trim(), template.manifest.instance_id);
    // The clock, read through the agent (no SSH latency) between two host readings.
    let (before, guest, after) = ns.block_on(|| async {
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        };
        let before = now();
        let out = vm
            .agent_exec(&["/bin/date", "+%s.%N"], Duration::from_secs(60))
            .await
            .unwrap();
        (before, out.stdout.trim().parse::<f64>().unwrap(), now())
    });
    assert!(
        guest > before - 2.0 && guest < after + 2.0,
        "the guest's clock {guest} is within 2 s of the host's ({before}..{after})"
    );
    sh(HOST_KEYS)
}

#[tokio::test]
async fn debian_guest_boots_to_ssh_survives_faults_and_leaves_the_golden_image_untouched() {
    let _one = one_vm_at_a_time();
    let env = Env::new();
    let golden = image::ensure(&env.dirs, &ImageChoice::default())
        .await
        .expect("golden image (built offline if missing)");
    let before = sha256(&golden.disk);
    let ns = Netns::new("deb");

    // The default shape, so this VM and the acceptance test's restore the same warm template
    // (whichever runs first builds it: a cold boot to cloud-init done, then the save).
    let out = env
        .cli_in(&ns)
        .run(&["up", "e2e", "--dns-name", "askari.wingu.me"]);
    assert!(out.status.success(), "{}", common::text(&out));
    let up = String::from_utf8_lossy(&out.stdout).into_owned();
    // The stages' times (and, when this run built the template, its cold boot's), for the log.
    for l in String::from_utf8_lossy(&out.stderr).lines() {
        if l.contains("<== ") || l.contains("warm template") || l.contains("cold boot") {
            eprintln!("up: {l}");
        }
    }
    assert!(up.contains("boma-it-e2e is up at 192.168.231."), "{up}");

    let status = env
        .cli_in(&ns)
        .ok(&["ssh", "e2e", "--", "cloud-init", "status", "--wait"]);
    assert!(status.contains("status: done"), "{status}");
    assert_eq!(
        env.cli_in(&ns)
            .ok(&["ssh", "e2e", "--", "systemctl", "is-active", "docker"])
            .trim(),
        "active"
    );
    assert_eq!(
        env.cli_in(&ns)
            .ok(&["ssh", "e2e", "--", "id", "-un"])
            .trim(),
        "ansible",
        "logged in with the run's key as ansible"
    );
    assert!(
        env.cli_in(&ns)
            .ok(&["ssh", "e2e", "--", "sudo", "-n", "nft", "list", "ruleset"])
            .contains("table"),
        "passwordless sudo works"
    );
    let resolved = env
        .cli_in(&ns)
        .ok(&["ssh", "e2e", "--", "getent", "hosts", "askari.wingu.me"]);
    let ip = env.cli_in(&ns).ok(&["ssh", "e2e", "--", "hostname", "-I"]);
    assert!(
        resolved
            .split_whitespace()
            .next()
            .is_some_and(|a| ip.contains(a)),
        "{resolved} vs {ip}"
    );

    let boot_id =
        env.cli_in(&ns)
            .ok(&["ssh", "e2e", "--", "cat", "/proc/sys/kernel/random/boot_id"]);
    let vm = Machine::attach(&env.dirs, "e2e")
        .unwrap()
        .with_start_options(start_options());
    let host_keys = distinct_warm_instance(&env, &ns, &vm);

    // The break-glass way in: the guest agent, no network or SSH involved.
    let agent = ns
        .block_on(|| async {
            let argv = [
                "/bin/sh",
                "-c",
                "id -un; cat /proc/sys/kernel/random/boot_id",
            ];
            vm.agent_exec(&argv, Duration::from_secs(60)).await
        })
        .unwrap();
    assert_eq!(agent.code, Some(0), "{agent:?}");
    assert!(
        agent.stdout.starts_with("root\n") && agent.stdout.contains(boot_id.trim()),
        "{agent:?}"
    );

    // A guest agent request whose client hung up before the reply (a timed-out call, an
    // operator's socat) must not cost the next clean reboot systemd's 90 s stop timeout. Without
    // a host end on the channel, qemu-ga (Debian 13: 10.0.x) spins in its write loop, never
    // reaches its main loop where SIGTERM would end it, and is SIGKILLed after 90 s; the
    // supervisor holds the host end for the VM's life and drains such replies.
    ns.block_on(|| async {
        use tokio::io::AsyncWriteExt;
        // Boot finished: the agent runs, and the shutdown below interrupts nothing still starting.
        ssh_retry(&vm, "systemctl is-system-running --wait; true").await;
        let qga_sock = vm.run_dir().join("qga.sock");
        let mut hasty = tokio::net::UnixStream::connect(&qga_sock).await.unwrap();
        hasty
            .write_all(b"{\"execute\":\"guest-ping\"}\n")
            .await
            .unwrap();
        drop(hasty);
        let journal = "sudo journalctl -b -u qemu-guest-agent --no-pager";
        let deadline = Instant::now() + S;
        while !ssh_retry(&vm, journal).await.contains("guest-ping called") {
            assert!(Instant::now() < deadline, "the agent never got the request");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let rebooted = vm.reboot().await.unwrap();
        vm.wait_ssh(BOOT).await.unwrap();
        let stop = ssh_retry(&vm, "sudo journalctl -b -1 -u qemu-guest-agent --no-pager").await;
        assert!(stop.contains("guest-ping called"), "{stop}");
        assert!(stop.contains("Stopped qemu-guest-agent"), "{stop}");
        assert!(
            !stop.contains("timed out") && !stop.contains("SIGKILL"),
            "qemu-ga did not stop on SIGTERM ({rebooted:?}):\n{stop}"
        );
    });

    // Faults where a real OS is the point.
    ns.block_on(|| async {
        let boot_id = "cat /proc/sys/kernel/random/boot_id";
        let boot1 = vm.succeed_within(boot_id, S).await.unwrap();

        // Link loss: SSH times out; link up brings it back, same boot.
        vm.link(false).await.unwrap();
        let r = vm.succeed_within("true", Duration::from_secs(20)).await;
        assert!(r.is_err(), "SSH worked with the link down: {r:?}");
        vm.link(true).await.unwrap();
        vm.wait_ssh(S).await.unwrap();
        assert_eq!(vm.succeed_within(boot_id, S).await.unwrap(), boot1, "no reboot");

        // A power cut while the guest writes and fsyncs files on its root filesystem.
        vm.succeed_within(
            "nohup sh -c 'i=0; while :; do dd if=/dev/urandom of=/var/tmp/w$((i % 4)) bs=1M count=4 conv=fsync 2>/dev/null; i=$((i+1)); echo $i > /var/tmp/count; done' >/dev/null 2>&1 &",
            S,
        )
        .await
        .unwrap();
        let deadline = Instant::now() + S;
        while vm.succeed_within("cat /var/tmp/count", S).await.unwrap_or_default().trim().parse::<u32>().unwrap_or(0) < 2 {
            assert!(Instant::now() < deadline, "the writer never got going");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        vm.power_cut().await.unwrap();
        let t1 = Instant::now();
        vm.skip_console();
        vm.power_on().await.unwrap();
        // The kernel logs to the serial console: ext4 replays its journal on the next mount.
        let line = vm.expect_console("recovery complete", BOOT).await.unwrap();
        assert!(line.contains("EXT4-fs"), "{line}");
        vm.wait_ssh(BOOT).await.unwrap();
        ssh_retry(&vm, "cloud-init status --wait >/dev/null; true").await;
        eprintln!("SSH again {:.0}s after power-on", t1.elapsed().as_secs_f64());
        assert_ne!(vm.succeed_within(boot_id, S).await.unwrap(), boot1, "a new boot");
        let opts = vm.succeed_within("findmnt -no OPTIONS /", S).await.unwrap();
        assert!(opts.starts_with("rw"), "root mounted {opts}");
        // The boot after a warm start is not a cloud-init first boot (the template's instance),
        // and it keeps this run's identity: cloud-init read this VM's seed again.
        assert_eq!(vm.succeed_within("hostname", S).await.unwrap().trim(), "e2e");
        assert_eq!(
            vm.succeed_within(HOST_KEYS, S).await.unwrap(),
            host_keys,
            "the SSH host keys were not regenerated: no first boot"
        );
        vm.succeed_within("echo after > /var/tmp/after && sync && cat /var/tmp/after", S).await.unwrap();
        let tl = timeline(&vm);
        let cut = tl.iter().position(|e| e == "FAULT:power-cut").unwrap();
        let start = cut + tl[cut..].iter().position(|e| e == names::QEMU_STARTED).unwrap();
        assert!(!tl[cut..start].iter().any(|e| e == "SHUTDOWN" || e == "POWERDOWN"), "{tl:?}");

        // Disk errors: reads of data still only in the golden image fail too. A root loop,
        // started while the disk works (so its programs are in the page cache), reads such a
        // block with O_DIRECT every second and reports on the kernel console: launching
        // anything new (sshd's session, sudo) through a failing disk is not reliable, and the
        // guest's own damage (ext4 aborts its journal and goes read-only) stays until a reboot.
        let block = block_only_in_the_backing(&vm);
        vm.succeed_within(
            &format!(
                "sudo nohup sh -c 'while :; do e=$(dd if=/dev/vda of=/dev/null bs=4096 count=1 skip={block} iflag=direct 2>&1 | grep -m1 -i error); echo \"BOMA-DISKPROBE ${{e:-ok}}\" > /dev/kmsg; sleep 1; done' >/dev/null 2>&1 &"
            ),
            S,
        )
        .await
        .unwrap();
        vm.skip_console();
        vm.expect_console("BOMA-DISKPROBE ok", S).await.unwrap();
        vm.disk_errors(true).await.unwrap();
        let line = vm.expect_console("BOMA-DISKPROBE dd", S).await.unwrap();
        assert!(line.contains("Input/output error"), "{line}");
        let ev = vm
            .wait_for("a read BLOCK_IO_ERROR", S, |r| {
                r.is("BLOCK_IO_ERROR") && r.data["operation"] == "read"
            })
            .await
            .unwrap();
        assert_eq!(ev.data["node-name"], "disk0");
        vm.disk_errors(false).await.unwrap();
        vm.expect_console("BOMA-DISKPROBE ok", S).await.unwrap();

    });

    env.cli_in(&ns).ok(&["down", "e2e"]);
    let left = ns.leftovers(&env.dirs.state);
    assert!(left.is_empty(), "left behind:\n{left}");
    assert_eq!(
        sha256(&golden.disk),
        before,
        "the golden image was never written"
    );
}
