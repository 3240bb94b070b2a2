#!/usr/bin/env bash
# Prove boma-qvm-netd.service under a real systemd, as PID 1, on a fresh Debian 13 (trixie) root,
# which no machine here offers otherwise (their PID 1 is not systemd):
#   1. a fresh trixie root filesystem with systemd is booted by systemd-nspawn, with a network
#      namespace of its own (nothing on the host's network changes) and no egress;
#   2. inside, the role's own task files apply there (twice; the second must change nothing):
#      users.yml (groups kvm and boma-qvm, QEMU's account, the operator), binary.yml (the binary
#      and /etc/boma-qvm/config.env) and netd.yml, which installs the unit and, seeing systemd is
#      PID 1, enables and starts it. Only packages.yml is left out (it needs the internet; the
#      packages it would install are in the root filesystem already);
#   3. the unit is active, its process has exactly the unit's CapabilityBoundingSet=, and its
#      socket is root:boma-qvm 0660;
#   4. an operator (a user in group boma-qvm, no sudo, a login as `runuser` makes one) brings up
#      the busybox test guest through that netd: QEMU runs as the operator, dnsmasq as nobody,
#      the guest gets a lease and answers on TCP from the control node;
#   5. `down`: netd takes the network down when its last VM goes (no table, no dnsmasq);
#      `systemctl restart` brings netd back and `systemctl stop` stops it cleanly.
#
# usage: tests/host/systemd-netd.sh BIN     (make test-host-systemd; needs root)
#
# Needs systemd-nspawn (Debian's systemd-container; installed here when missing) and the built
# busybox test guest (`boma-qvm doctor --boot-test` builds it; .ci/run runs that first).
# Kept for the next run: the root filesystem's tarball in $HOSTTEST_CACHE. Nothing else is left:
# the container's processes, network and mounts die with it; the trap stops it and removes its
# root. Environment: SUITE (trixie), BOMA_QVM_DEBIAN_MIRROR, HOSTTEST_CACHE.
set -euo pipefail

TAG=systemd
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/nspawn.sh"
# What the role's packages.yml would install, and what the checks use; Ansible is the release's.
PACKAGES="dnsmasq-base nftables iproute2 procps qemu-system-x86 ansible-core libcap2-bin"

host_test_bin "$@"
repo=$(cd "$(dirname "$0")/../.." && pwd)
tg=$(ls -d /var/cache/boma-qvm/testguest-*/ "$HOME"/.cache/boma-qvm/testguest-*/ 2>/dev/null | head -n1 || true)
[ -n "$tg" ] || die "no built busybox test guest. Fix: run \`boma-qvm doctor --boot-test\` once"
tarball=$(nspawn_root_tarball "$PACKAGES" netd)

work=$(mktemp -d /var/tmp/bq-sdnetd.XXXXXX)
root=$work/root
cleanup() {
    local rc=$?
    nspawn_stop "$rc" "$root"
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$root"
tar --numeric-owner -xzf "$tarball" -C "$root"
mkdir -p "$root/opt/boma-qvm-prebuilt" "$root/opt/boma-roles" "$root/var/cache/boma-qvm/testguest"
install -m 0755 "$bin" "$root/opt/boma-qvm-prebuilt/boma-qvm"
cat >"$root/root/netd.yml" <<'EOF'
# The role's task files that need no internet (packages.yml is the one that does).
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    integration_test_binary_src: /opt/boma-qvm-prebuilt/boma-qvm
    integration_test_users: [alice]
    integration_test_create_users: true
  tasks:
    - ansible.builtin.include_role: {name: integration_test, tasks_from: users.yml}
    - ansible.builtin.include_role: {name: integration_test, tasks_from: cache.yml}
    - ansible.builtin.include_role: {name: integration_test, tasks_from: binary.yml}
    - ansible.builtin.include_role: {name: integration_test, tasks_from: netd.yml}
EOF

log "booting $SUITE with systemd as PID 1 (systemd-nspawn, private network)"
nspawn_boot "$root" --private-network \
    --bind-ro="$repo/roles:/opt/boma-roles" --bind-ro="$tg:/var/cache/boma-qvm/testguest"

apply() {
    in_c env ANSIBLE_ROLES_PATH=/opt/boma-roles ANSIBLE_NOCOLOR=1 \
        ansible-playbook -i localhost, /root/netd.yml >"$work/apply$1.log" 2>&1 \
        || { cat "$work/apply$1.log" >&2; die "apply $1 of the role's task files failed"; }
    grep -E '^localhost +: ok=' "$work/apply$1.log" | tr -s ' '
}
log "inside: apply 1: $(apply 1)"
grep -q 'TASK \[integration_test : Enable and start boma-qvm-netd\]' "$work/apply1.log" \
    && ! grep -A2 'Enable and start boma-qvm-netd' "$work/apply1.log" | grep -q skipping \
    || { cat "$work/apply1.log" >&2; die "the role did not enable and start the unit under systemd"; }
recap=$(apply 2)
log "inside: apply 2: $recap"
grep -Eq 'changed=0 +unreachable=0 +failed=0' <<<"$recap" || { cat "$work/apply2.log" >&2; die "the second apply changed something"; }

# 3. The unit, its capabilities and its socket.
[ "$(in_c systemctl is-enabled boma-qvm-netd)" = enabled ] || die "the unit is not enabled"
[ "$(in_c systemctl is-active boma-qvm-netd)" = active ] \
    || { in_c journalctl -u boma-qvm-netd --no-pager >&2; die "the unit is not active"; }
main=$(in_c systemctl show -p MainPID --value boma-qvm-netd)
bnd=$(in_c awk '/^CapBnd/ {print $2}' /proc/"$main"/status)
have=$(in_c capsh --decode="$bnd" | sed 's/.*=//' | tr ',' '\n' | sort | xargs)
want=$(sed -n 's/^CapabilityBoundingSet=//p' "$repo/roles/integration_test/templates/boma-qvm-netd.service.j2" \
    | tr ' ' '\n' | tr '[:upper:]' '[:lower:]' | sort | xargs)
[ -n "$want" ] && [ "$have" = "$want" ] || die "netd's bounding set is '$have', the unit says '$want'"
log "inside: boma-qvm-netd.service active (pid $main), bounding set: $have"
sock=$(in_c stat -c '%a %U %G' /run/boma-qvm/netd.sock)
[ "$sock" = "660 root boma-qvm" ] || die "netd's socket is '$sock', not '660 root boma-qvm'"

# 4. An operator, without sudo, through the unit's netd.
as_alice() { nsenter -t "$leader" -a runuser -u alice -- env -i PATH=$SYS_PATH HOME=/home/alice "$@"; }
groups=$(as_alice id -nG)
grep -qw boma-qvm <<<"$groups" || die "alice is not in group boma-qvm after the role: $groups"
log "inside: as alice ($groups): boma-qvm up (the busybox test guest, through netd)"
as_alice boma-qvm up sd --kernel /var/cache/boma-qvm/testguest/vmlinuz \
    --initrd /var/cache/boma-qvm/testguest/initrd.img --append "console=ttyS0 boma.net=1" \
    --cpus 1 --memory 256 >&2
ip= t=$SECONDS
while [ $((SECONDS - t)) -lt 120 ]; do
    ip=$(as_alice boma-qvm console sd --log 2>/dev/null | sed -n 's/.*BOMA-TESTGUEST-IP \([0-9.]*\).*/\1/p' | tail -n1)
    [ -n "$ip" ] && break
    sleep 1
done
[ -n "$ip" ] || { as_alice boma-qvm console sd --log 2>&1 | tail -n 20 >&2; die "no DHCP lease in 120 s"; }
said=$(as_alice timeout 30 bash -c "exec 3<>/dev/tcp/$ip/7000; echo 'uname -r; exit' >&3; cat <&3")
[ -n "$said" ] || die "the guest at $ip:7000 said nothing"
log "inside: lease $ip after $((SECONDS - t)) s; the guest answered: $said"
qemu_user=$(in_c ps -eo user=,args= | awk '$2 ~ /qemu-system-x86_64$/ {print $1}' | sort -u | xargs)
[ "$qemu_user" = alice ] || die "QEMU runs as '$qemu_user', not as the operator"
dpid=$(in_c cat /var/lib/boma-qvm/netd/net/dnsmasq.pid)
duid=$(in_c awk '/^Uid:/ {print $2}' /proc/"$dpid"/status)
[ "$duid" = "$(in_c id -u nobody)" ] || die "dnsmasq (pid $dpid) runs as uid $duid, not nobody"
in_c nft list table inet boma_qvm >/dev/null || die "no nft table inet boma_qvm while a VM runs"
log "inside: QEMU runs as alice, dnsmasq as nobody, nft table inet boma_qvm loaded"

# 5. Down, restart, stop.
as_alice boma-qvm down sd >&2
for _ in $(seq 1 50); do in_c nft list table inet boma_qvm >/dev/null 2>&1 || break; sleep 0.2; done
! in_c nft list table inet boma_qvm >/dev/null 2>&1 || die "netd kept its nft table after the last VM went"
! in_c pgrep -x dnsmasq >/dev/null || die "dnsmasq still runs after the last VM went"
in_c systemctl restart boma-qvm-netd
[ "$(in_c systemctl is-active boma-qvm-netd)" = active ] || die "netd did not come back after restart"
in_c systemctl stop boma-qvm-netd
state="$(in_c systemctl show -p ActiveState --value boma-qvm-netd) $(in_c systemctl show -p Result --value boma-qvm-netd)"
[ "$state" = "inactive success" ] || { in_c journalctl -u boma-qvm-netd --no-pager >&2; die "netd did not stop cleanly: $state"; }
log "inside: down took the network with it; restart and stop are clean"
log "all passed in $SECONDS s"
