//! End to end on a real Debian 13 guest: the offline-built golden image (built once into the XDG
//! cache, reused after), a cloud-init seed with a per-run key, the isolated network inside a
//! namespace this test creates, SSH with the generated key, the guest agent — and the golden
//! image byte-for-byte unchanged afterwards. One booted guest serves every assertion; the real
//! reboot of a Debian guest is covered by the acceptance test.

mod common;

use boma_qvm::image::{self, ImageChoice};
use common::Env;
use common::netns::Netns;
use std::process::Output;

fn sha256(path: &std::path::Path) -> String {
    boma_qvm::image::tool::sha256_file(path).unwrap()
}

struct Cli<'a> {
    ns: &'a Netns,
    env: &'a Env,
}

impl Cli<'_> {
    fn run(&self, args: &str) -> Output {
        self.ns.exec(&format!(
            "BOMA_QVM_STATE_DIR={} BOMA_QVM_CACHE_DIR={} {} {args}",
            self.env.dirs.state.display(),
            self.env.dirs.cache.display(),
            env!("CARGO_BIN_EXE_boma-qvm")
        ))
    }

    fn ok(&self, args: &str) -> String {
        let o = self.run(args);
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "`boma-qvm {args}` failed:\n{out}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

#[tokio::test]
async fn debian_guest_boots_to_ssh_and_leaves_the_golden_image_untouched() {
    let env = Env::new();
    let golden = image::ensure(&env.dirs, &ImageChoice::Auto)
        .await
        .expect("golden image (built offline if missing)");
    let before = sha256(&golden.disk);
    let ns = Netns::new("deb");
    let cli = Cli { ns: &ns, env: &env };

    let up = cli.ok("up e2e --memory 2048 --dns-name askari.wingu.me");
    assert!(up.contains("boma-it-e2e is up at 192.168.231."), "{up}");

    let status = cli.ok("ssh e2e -- cloud-init status --wait");
    assert!(status.contains("status: done"), "{status}");
    assert_eq!(
        cli.ok("ssh e2e -- systemctl is-active docker").trim(),
        "active"
    );
    assert_eq!(
        cli.ok("ssh e2e -- id -un").trim(),
        "ansible",
        "logged in with the run's key as ansible"
    );
    assert!(
        cli.ok("ssh e2e -- sudo -n nft list ruleset")
            .contains("table"),
        "passwordless sudo works"
    );
    let resolved = cli.ok("ssh e2e -- getent hosts askari.wingu.me");
    let ip = cli.ok("ssh e2e -- hostname -I");
    assert!(
        resolved
            .split_whitespace()
            .next()
            .is_some_and(|a| ip.contains(a)),
        "{resolved} vs {ip}"
    );

    let boot_id = cli.ok("ssh e2e -- cat /proc/sys/kernel/random/boot_id");
    let vm = boma_qvm::vm::Vm::open(&env.dirs, "boma-it-e2e").unwrap();

    // The break-glass way in: the guest agent, no network or SSH involved.
    let qga_sock = vm.run.qga_sock();
    let agent = ns
        .block_on(|| async {
            let argv = [
                "/bin/sh",
                "-c",
                "id -un; cat /proc/sys/kernel/random/boot_id",
            ];
            boma_qvm::qga::exec(&qga_sock, &argv, std::time::Duration::from_secs(60)).await
        })
        .unwrap();
    assert_eq!(agent.code, Some(0), "{agent:?}");
    assert!(
        agent.stdout.starts_with("root\n") && agent.stdout.contains(boot_id.trim()),
        "{agent:?}"
    );

    cli.ok("down e2e");
    let left = ns.exec("ip -o link show; nft list tables; pgrep -a dnsmasq || true");
    let left = String::from_utf8_lossy(&left.stdout).into_owned();
    assert!(
        !left.contains("boma-qvm0") && !left.contains("boma_qvm") && !left.contains("bq-"),
        "{left}"
    );
    assert_eq!(
        sha256(&golden.disk),
        before,
        "the golden image was never written"
    );
}
