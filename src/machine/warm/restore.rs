//! Restoring a template into a new VM and re-identifying the guest as this run's own.

use super::Template;
use super::template::{dir_of, lock};
use crate::error::IoContext;
use crate::guest::image::Image;
use crate::machine::provision::{self, Made, Plan, SeedPlan, UpRequest};
use crate::machine::qga;
use crate::machine::spec;
use crate::machine::vm::Vm;
use crate::stage::Stages;
use crate::{Error, Result, error::show, paths::Dirs};
use std::time::Duration;

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
