# Sourced by tests/host/*.sh: a fresh Debian root booted by systemd-nspawn with systemd as PID 1,
# which no machine here has otherwise. Needs root; sets `leader` (the container's PID 1, as the
# host sees it) for `in_c`, and stops the container in `nspawn_stop` (call it from the EXIT trap).
# Source lib/common.sh first (log, die, SUITE, MIRROR, CACHE, SYS_PATH).

# The cached root filesystem tarball of $SUITE with systemd and $1 (space-separated packages,
# installed with apt, which orders their configuration better than debootstrap --include);
# $2 names the flavour in the tarball's name. Prints the tarball's path.
nspawn_root_tarball() {
    local packages=$1 flavour=$2 tarball tmp
    command -v systemd-nspawn >/dev/null \
        || env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd-container >&2
    mkdir -p "$CACHE"
    chmod 0700 "$CACHE"
    tarball=$CACHE/$SUITE-systemd-$flavour.tar.gz
    if [ ! -s "$tarball" ]; then
        log "building $tarball: debootstrap --variant=minbase $SUITE with systemd, then $packages (once; kept)"
        tmp=$(mktemp -d /var/tmp/bq-sdroot.XXXXXX)
        { debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus "$SUITE" "$tmp/root" "$MIRROR" \
            && { [ -z "$packages" ] || chroot "$tmp/root" env -i PATH="$SYS_PATH" DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends $packages; } \
            && chroot "$tmp/root" apt-get clean \
            && rm -rf "$tmp/root"/var/lib/apt/lists/* \
            && tar --numeric-owner -czf "$tarball.part" -C "$tmp/root" . \
            && mv "$tarball.part" "$tarball"; } >"$tarball.log" 2>&1 \
            || { rm -rf "$tmp"; tail -n 20 "$tarball.log" >&2; die "building the root failed: see $tarball.log"; }
        rm -rf "$tmp"
    fi
    printf '%s\n' "$tarball"
}

# Boot the root at $1 (its console goes to $1.console); more systemd-nspawn arguments follow
# (a network: --private-network or --network-namespace-path=, binds). Waits until systemd is
# up, and fails unless it is PID 1 inside.
nspawn_boot() {
    local root=$1 state
    shift
    # --register=no/--keep-unit: no machined or host systemd to talk to. The unified cgroup
    # hierarchy: trixie's systemd supports no other.
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -D "$root" -M "bqsd$$" -b --register=no \
        --keep-unit --console=passive "$@" >"$root.console" 2>&1 </dev/null &
    nspawn_pid=$!
    leader=
    for _ in $(seq 1 100); do
        leader=$(pgrep -P "$nspawn_pid" | head -n1 || true)
        [ -n "$leader" ] && [ "$(cat /proc/"$leader"/comm 2>/dev/null)" = systemd ] && break
        leader=
        sleep 0.2
    done
    [ -n "$leader" ] || { cat "$root.console" >&2; die "the container's systemd did not start"; }
    state=$(in_c timeout 60 systemctl is-system-running --wait || true)
    case $state in
        running|degraded) ;;
        *) in_c systemctl --failed --no-pager >&2 || true; die "systemd did not come up: '$state'" ;;
    esac
    [ "$(in_c cat /proc/1/comm)" = systemd ] || die "PID 1 inside is not systemd"
    log "inside: systemd is PID 1 and $state"
}

# Run a command inside, as root, with the system PATH only.
in_c() { nsenter -t "$leader" -a env -i PATH="$SYS_PATH" HOME=/root "$@"; }

# Stop the container: SIGTERM asks its systemd to power off; 20 s, then it is killed. On a
# failure ($1 non-zero), show the end of its console first.
nspawn_stop() {
    local rc=$1 root=$2
    if [ -n "${nspawn_pid:-}" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ] && [ -s "$root.console" ]; then
        log "failed (exit $rc); the container's console, last lines:"
        tail -n 30 "$root.console" >&2
    fi
}
