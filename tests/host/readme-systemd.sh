#!/usr/bin/env bash
# The README's first command, verbatim, by a sudo user on a fresh Debian 13 (trixie) machine
# that runs systemd, to the main job's red verdict:
#
#     .ci/setup && make test-integration HOST=askari
#
# in one login session, as a new user would type it. The machine: a fresh trixie root (minbase,
# systemd, sudo) booted by systemd-nspawn with systemd as PID 1, in a network namespace of its
# own (--private-network) whose only way out is slirp4netns's user-mode NAT (Debian's mirror and PyPI, as a site
# gives them; nothing on the host's network changes). Inside, `.ci/setup` installs everything
# from the network (apt, ansible-core from PyPI), applies the role (which starts
# boma-qvm-netd.service under systemd) and builds the golden image into the shared cache; then
# `make test-integration` runs `boma-qvm cycle askari` as that user, without sudo, through netd,
# in the same session (the groups the set-up added arrive through .ci/with-groups). Checked:
# boma-qvm's exit 14 (make: Error 14) with the published-port message; netd is the unit's; the
# start was warm, from the user's own template; QEMU (the kept VM's) runs as the user; Ansible
# was confined through netd; every file of the run is the user's.
#
# usage: tests/host/readme-systemd.sh BIN     (make test-readme-systemd; needs root)
#
# What is not the real thing, and why:
#   - BIN, a boma-qvm built on this (Debian 12) machine, is installed with .ci/setup's
#     PREBUILT_BIN: sh.rustup.rs is unreachable here and trixie's rustc is older than the
#     dependencies' minimum (tests/host/debian13.sh says the same);
#   - the user's sudo needs no password (.ci/setup runs unattended here);
#   - no /dev/kvm (TCG), as everywhere on these machines.
# About 7 min under TCG (measured 419 s: apt and pip through slirp, the image build, the cycle).
# Kept for the next run: the root's tarball in $HOSTTEST_CACHE. Nothing else is left.
# Environment: SUITE (trixie), BOMA_QVM_DEBIAN_MIRROR, HOSTTEST_CACHE.
set -euo pipefail

TAG=readme
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/nspawn.sh"

host_test_bin "$@"
repo=$(cd "$(dirname "$0")/../.." && pwd)
# A fresh machine: systemd, sudo and the installer's apt sources; nothing of boma-qvm's.
tarball=$(nspawn_root_tarball "sudo" sudo)

start=$SECONDS
work=$(mktemp -d /var/tmp/bq-readme.XXXXXX)
root=$work/root
slirp_pid=
cleanup() {
    local rc=$?
    nspawn_stop "$rc" "$root"
    [ -n "$slirp_pid" ] && kill "$slirp_pid" 2>/dev/null || true
    rm -rf "$work"
    if [ "$rc" -eq 0 ]; then log "PASS in $((SECONDS - start)) s"; else log "FAIL (exit $rc) after $((SECONDS - start)) s"; fi
}
trap cleanup EXIT

mkdir -p "$root"
tar --numeric-owner -xzf "$tarball" -C "$root"
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
site_root "$root"
# The sudo user and a clean copy of the repository in their home (git archive HEAD).
mkdir -p "$root/opt/boma-qvm-prebuilt"
install -m 0755 "$bin" "$root/opt/boma-qvm-prebuilt/boma-qvm"
chroot "$root" useradd -m -s /bin/bash -G sudo alice
printf 'alice ALL=(ALL:ALL) NOPASSWD: ALL\n' >"$root/etc/sudoers.d/alice"
chmod 0440 "$root/etc/sudoers.d/alice"
mkdir -p "$root/home/alice/boma-qvm"
git -C "$repo" archive --format=tar HEAD | tar -xf - -C "$root/home/alice/boma-qvm"
chroot "$root" chown -R alice:alice /home/alice/boma-qvm
[ -z "$(git -C "$repo" status --porcelain --untracked-files=no)" ] \
    || log "note: uncommitted changes in $repo are NOT tested (the copy is git archive HEAD)"

log "booting $SUITE with systemd as PID 1 (systemd-nspawn; egress only through slirp4netns)"
nspawn_boot "$root" --private-network
# Its network namespace's only way out.
slirp_up "$leader" "$work/slirp.log"

# One login session of alice's (runuser gives it the groups alice has now: sudo, not yet kvm
# or boma-qvm), typing the README's command in a fresh clone.
log "inside: as alice, one session: .ci/setup && make test-integration HOST=askari"
rc=0
nsenter -t "$leader" -a runuser -u alice -- env -i PATH="$SYS_PATH" HOME=/home/alice TERM=dumb \
    bash -c 'cd ~/boma-qvm && PREBUILT_BIN=/opt/boma-qvm-prebuilt/boma-qvm .ci/setup && make test-integration HOST=askari' \
    >"$work/readme.log" 2>&1 || rc=$?
cp "$work/readme.log" "$CACHE/readme-last.log"
log "inside: exit $rc; last lines (all of it: $CACHE/readme-last.log):"
tail -n 25 "$work/readme.log" >&2
if [ "$rc" -ne 14 ]; then
    in_c systemctl status --no-pager boma-qvm-netd >&2 || true
    in_c journalctl --no-pager -n 30 -u boma-qvm-netd >&2 || true
fi
# make exits 2 for any failed recipe and names the recipe's own code.
[ "$rc" -eq 2 ] && grep -q '^make: \*\*\* \[Makefile:[0-9]*: test-integration\] Error 14$' "$work/readme.log" \
    || die "want boma-qvm's exit 14 (the incident's red verdict) through make, got exit $rc"
grep -q 'published port' "$work/readme.log" || die "no published-port message in the output"
grep -q "joined group(s) boma-qvm kvm .*running through \`sudo -u alice\`" "$work/readme.log" \
    || die "the session's groups did not come through .ci/with-groups"

# What ran, and as whom.
[ "$(in_c systemctl is-active boma-qvm-netd)" = active ] || die "boma-qvm-netd.service is not active"
run=$(in_c sh -c 'ls -d /home/alice/integration-runs/*/ | tail -n1')
[ -n "$run" ] || die "no run directory in alice's ~/integration-runs"
in_c grep -q '^# confined: .*a veth from netd at /run/boma-qvm/netd.sock' "$run/apply.log" \
    || die "Ansible did not run confined through the unit's netd ($run/apply.log)"
in_c grep -q '"start": "warm: restored from /home/alice/.local/state/boma-qvm/warm/' "$run/report.json" \
    || die "not a warm start from alice's own template ($run/report.json)"
# (no procps on a minbase machine: /proc itself)
qemu_user=$(in_c sh -c 'for p in /proc/[0-9]*; do
    case "$(tr "\0" " " <"$p/cmdline" 2>/dev/null)" in qemu-system-x86_64\ *|*/qemu-system-x86_64\ *) stat -c %U "$p" ;; esac
done' | sort -u | xargs)
[ "$qemu_user" = alice ] || die "the kept VM's QEMU runs as '$qemu_user', not as alice"
foreign=$(in_c find "$run" /home/alice/.local/state/boma-qvm ! -user alice | head -n 3)
[ -z "$foreign" ] || die "files of the run not alice's: $foreign"
log "inside: the unit's netd, a warm start from alice's own template, Ansible confined through netd, every file of the run alice's"
