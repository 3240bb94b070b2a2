#!/usr/bin/env bash
# The main job as an operator without sudo, on this machine, end to end: a real Debian 13 guest,
# the bundled example, `boma-qvm cycle askari` run by a user the script creates (groups
# boma-qvm and kvm, as the role makes them), through a real `boma-qvm netd` (root, started as a
# plain process: PID 1 here is not systemd), to the incident's red verdict (exit 14, the
# published-port message). Its first run of the image's shape builds the operator's own warm
# template (the shared cache is root's), so a second run in the same state is warm.
#
# usage: tests/host/operator-cycle.sh [BIN]   (as root; BIN defaults to target/debug/boma-qvm)
#
# What stands in for the real host, and why:
#   - netd and the operator's commands share a network namespace the script makes (on a real
#     host both are in the host's), so no bridge, nft table or dnsmasq appears on this
#     machine's network. The operator's commands enter it through `ip netns exec` as root and
#     then drop to the operator with setpriv before boma-qvm starts.
#   - The golden image: root puts it into the shared cache (/etc/boma-qvm/config.env's
#     BOMA_QVM_CACHE_DIR) with `boma-qvm image build` when it is not there yet (a few minutes).
#
# Environment: OPCYCLE_RUNS=N (1) cycles in a row (the second is warm), OPCYCLE_KEEP=1 keeps the
# operator's home (reports) under /tmp. Nothing else is left: the trap prunes the operator's
# VMs, stops netd (which takes its network down), deletes the namespace and the user.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=$(realpath "${1:-target/debug/boma-qvm}")
RUNS=${OPCYCLE_RUNS:-1}
[ "$(id -u)" -eq 0 ] || { echo "operator-cycle: run as root (it creates a user and a netns)" >&2; exit 2; }
log() { printf '%s operator-cycle: %s\n' "$(date +%T)" "$*"; }

user=bqop$$
ns=bqop-$$
dir=$(mktemp -d /tmp/bqop.XXXXXX)
chmod 755 "$dir"
netd_pid=
cleanup() {
    set +e
    if id "$user" >/dev/null 2>&1; then
        ip netns exec "$ns" setpriv --reuid "$user" --regid "$user" --init-groups \
            env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$dir/home" \
            BOMA_QVM_NETD_SOCKET="$dir/netd.sock" "$dir/boma-qvm" prune >/dev/null 2>&1
        pkill -KILL -u "$user" 2>/dev/null
    fi
    [ -n "$netd_pid" ] && kill "$netd_pid" 2>/dev/null && wait "$netd_pid" 2>/dev/null
    ip netns del "$ns" 2>/dev/null
    userdel "$user" 2>/dev/null
    if [ "${OPCYCLE_KEEP:-0}" = 1 ]; then log "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

# The golden image in the shared cache: root's job (the runbook's `sudo boma-qvm image build`).
if ! "$BIN" image list 2>/dev/null | grep -q 'debian-13-built'; then
    log "no debian-13-built in the shared cache: boma-qvm image build (as root)"
    "$BIN" image build
fi

ip netns add "$ns"
ip -n "$ns" link set lo up
# The operator runs the same binary, from a place they can read.
install -m 755 "$BIN" "$dir/boma-qvm"
ip netns exec "$ns" "$dir/boma-qvm" netd --socket "$dir/netd.sock" --state-dir "$dir/netd" \
    >"$dir/netd.log" 2>&1 &
netd_pid=$!
for _ in $(seq 100); do [ -S "$dir/netd.sock" ] && break; sleep 0.1; done
[ -S "$dir/netd.sock" ] || { cat "$dir/netd.log" >&2; exit 1; }

getent group boma-qvm >/dev/null || groupadd --system boma-qvm
getent group kvm >/dev/null || groupadd --system kvm
useradd --create-home --home-dir "$dir/home" --groups boma-qvm,kvm --shell /bin/sh "$user"
cp -r tests/fixtures/boma "$dir/home/repo"
chown -R "$user:" "$dir/home/repo"
as_op() {
    ip netns exec "$ns" setpriv --reuid "$user" --regid "$user" --init-groups \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME="$dir/home" \
        BOMA_QVM_NETD_SOCKET="$dir/netd.sock" "$dir/boma-qvm" "$@"
}

status=0
for i in $(seq "$RUNS"); do
    log "cycle $i of $RUNS as $user (uid $(id -u "$user")), no sudo"
    start=$SECONDS
    set +e
    as_op cycle askari --repo "$dir/home/repo" --certs internal 2>&1 | tee "$dir/cycle-$i.log"
    rc=${PIPESTATUS[0]}
    set -e
    log "cycle $i exited $rc after $((SECONDS - start)) s"
    # A red cycle keeps its VM for inspection: remove it, as the operator would.
    as_op down askari >/dev/null 2>&1 || true
    if [ "$rc" -ne 14 ] || ! grep -q 'published port' "$dir/cycle-$i.log"; then
        log "FAIL: want the incident's red verdict (exit 14, the published-port message)"
        status=1
    fi
    run=$(ls -d "$dir"/home/integration-runs/*/ | tail -1)
    # Warm, from the operator's own template (the shared cache is root's).
    grep -q "\"start\": \"warm: restored from $dir/home/.local/state/boma-qvm/warm/" "$run/report.json" \
        || { log "FAIL: not a warm start from the operator's own template ($run/report.json)"; status=1; }
    # Ansible confined through netd's veth.
    grep -q "^# confined: .*a veth from netd at $dir/netd.sock" "$run/apply.log" \
        || { log "FAIL: the apply was not confined through netd ($run/apply.log)"; status=1; }
    # Everything the run wrote is the operator's.
    foreign=$(find "$run" "$dir/home/.local/state/boma-qvm" ! -user "$user" | head -3)
    [ -z "$foreign" ] || { log "FAIL: not the operator's: $foreign"; status=1; }
done
log "the operator's warm templates: $(ls "$dir/home/.local/state/boma-qvm/warm/"* 2>/dev/null | tr '\n' ' ')"
left=$(as_op list 2>&1 | grep -c boma-it- || true)
[ "$left" -eq 0 ] || { log "FAIL: $left VM(s) left"; status=1; }
[ "$status" -eq 0 ] && log "PASS"
exit "$status"
