#!/usr/bin/env bash
# Prove the README's set-up on a fresh Debian 13 (trixie) control node, on this machine, without a
# VM: a fresh trixie root filesystem (debootstrap minbase, from Debian's mirror), entered in its
# own mount, PID, network, UTS and IPC namespaces, where
#   1. `.ci/setup` runs from a clean copy of HEAD (git archive), as root, with a minimal
#      environment: bootstrap packages, ansible-core from PyPI into /opt/boma-qvm-ansible with
#      trixie's python3, the integration_test role applied twice (the second apply must report
#      changed=0), then the read-only checks;
#   2. `env -i PATH=<system> HOME=/root boma-qvm doctor`, then the same with --boot-test (builds
#      the busybox test guest from trixie's kernel package and boots it under TCG), as .ci/run;
#   3. tests/host/net-check.sh: that guest `up` on boma-qvm's own network (HOSTTEST_NET).
#
# usage: tests/host/debian13.sh BIN     (make test-host-debian13; needs root)
#
# What is not the real thing, and why:
#   - BIN, a boma-qvm built on this (Debian 12) machine, is installed with .ci/setup's
#     PREBUILT_BIN: sh.rustup.rs is unreachable here and trixie's rustc (1.85) is older than the
#     dependencies' minimum (1.88). Building on trixie is not proven by this script.
#   - The network: slirp4netns gives the namespace its own user-mode NAT (10.0.2.100, DNS at
#     10.0.2.3) out through this machine's sockets, so nothing on the host's network changes.
#     This machine's egress CA (/usr/local/share/ca-certificates/*.crt) and /etc/pip.conf are
#     copied in, as a site would provision them; without them PyPI's TLS is not trusted here.
#   - PID 1 is a shell, not systemd (as on this machine); the root filesystem lives in a tmpfs.
#
# Nothing is left behind: the tmpfs and every mount exist only in the private mount namespace,
# every process in the PID namespace dies with it, and the trap kills both and slirp4netns.
# Kept for the next run: the minbase tarball in $HOSTTEST_CACHE (default /var/cache/boma-qvm-hosttest).
#
# Environment: HOSTTEST_AS=root (default) or user: a sudo user (`alice`, passwordless sudo,
#   as .ci/setup needs unattended) runs .ci/setup from its home, and `sudo boma-qvm doctor`;
#   HOSTTEST_NET=1 (the default; 0 skips it) then also runs tests/host/net-check.sh there: the
#   test guest `up` on boma-qvm's bridge, nft table and dnsmasq (a DHCP lease, TCP from the
#   control node), then `down` and `net down` (about 15 s);
#   HOSTTEST_IMAGE_BUILD=1 lets .ci/setup build the golden image there (SETUP_IMAGE=1; about
#   3 more minutes and up to ~5 GiB more of the tmpfs, so give HOSTTEST_TMPFS_SIZE=12g);
#   SUITE (trixie), BOMA_QVM_DEBIAN_MIRROR (http://deb.debian.org/debian), HOSTTEST_CACHE,
#   HOSTTEST_TMPFS_SIZE (6g).
set -euo pipefail

TAG=host
. "$(dirname "$0")/lib/common.sh"
TMPFS_SIZE=${HOSTTEST_TMPFS_SIZE:-6g}
AS=${HOSTTEST_AS:-root}
IMAGE_BUILD=${HOSTTEST_IMAGE_BUILD:-0}
NET=${HOSTTEST_NET:-1}

# ---------------------------------------------------------------------------------------------
# Inside the namespaces (PID 1 of the new PID namespace): `debian13.sh --inner WORK BIN`.
inner() {
    local work=$1 bin=$2 root=$1/root
    # The root filesystem: a tmpfs, private to this mount namespace.
    mount -t tmpfs -o size="$TMPFS_SIZE",mode=0755 boma-d13 "$root"
    tar --numeric-owner -xzf "$CACHE/$SUITE-minbase.tar.gz" -C "$root"

    # The clean copy of the repository and the prebuilt binary.
    mkdir -p "$root/root/boma-qvm" "$root/opt/boma-qvm-prebuilt"
    tar -xf "$work/repo.tar" -C "$root/root/boma-qvm"
    install -m 0755 "$bin" "$root/opt/boma-qvm-prebuilt/boma-qvm"

    site_root "$root"
    hostname debian13-host

    # The kernel's filesystems and a minimal /dev (what a booted machine has; /dev/kvm and
    # /dev/net/tun bound from the host).
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount -t tmpfs -o mode=0755,size=64m dev "$root/dev"
    local n
    for n in null zero full random urandom tty kvm net/tun; do
        [ -e "/dev/$n" ] || continue
        mkdir -p "$(dirname "$root/dev/$n")"
        touch "$root/dev/$n"
        mount --bind "/dev/$n" "$root/dev/$n"
    done
    mkdir -p "$root/dev/pts" "$root/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
    ln -s pts/ptmx "$root/dev/ptmx"
    mount -t tmpfs -o mode=1777 shm "$root/dev/shm"
    ln -s /proc/self/fd "$root/dev/fd"
    ln -s /proc/self/fd/0 "$root/dev/stdin"
    ln -s /proc/self/fd/1 "$root/dev/stdout"
    ln -s /proc/self/fd/2 "$root/dev/stderr"
    mount -t tmpfs -o mode=0755 run "$root/run"

    # Wait for slirp4netns (started from outside) to bring up tap0.
    local i
    for i in $(seq 1 100); do [ -e "$work/net-ready" ] && break; sleep 0.1; done
    [ -e "$work/net-ready" ] || die "the namespace's network (slirp4netns) did not come up"

    # As a login on a fresh machine: system PATH, HOME, nothing else.
    in_root() { chroot "$root" /usr/bin/env -i PATH="$SYS_PATH" HOME=/root TERM=dumb "$@"; }
    log "inside: $(in_root cat /etc/debian_version) root filesystem, $(in_root uname -r) kernel (the host's)"
    local home=/root sudo=
    if [ "$AS" = user ]; then
        # A machine installed with a sudo user: sudo, the user in group sudo. .ci/setup runs
        # unattended, so that user's sudo needs no password here (an operator would type it).
        home=/home/alice sudo=sudo
        log "inside: a sudo user: apt-get install sudo; useradd -m -G sudo alice (NOPASSWD)"
        in_root bash -c 'apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends sudo >/dev/null'
        in_root useradd -m -s /bin/bash -G sudo alice
        printf 'alice ALL=(ALL:ALL) NOPASSWD: ALL\n' >"$root/etc/sudoers.d/alice"
        chmod 0440 "$root/etc/sudoers.d/alice"
        mv "$root/root/boma-qvm" "$root$home/boma-qvm"
        in_root chown -R alice:alice "$home/boma-qvm"
        as_user() { in_root su -l alice -c "$*"; }
    else
        as_user() { in_root bash -c "$*"; }
    fi

    # The golden image (.ci/setup's last step) only with HOSTTEST_IMAGE_BUILD=1: it needs a
    # bigger tmpfs.
    log "inside: as $AS: cd ~/boma-qvm && SETUP_IMAGE=$IMAGE_BUILD PREBUILT_BIN=/opt/boma-qvm-prebuilt/boma-qvm .ci/setup"
    as_user "cd ~/boma-qvm && SETUP_IMAGE=$IMAGE_BUILD PREBUILT_BIN=/opt/boma-qvm-prebuilt/boma-qvm .ci/setup"
    # The second apply (make setup-check) failed above unless it said changed=0; show its recap.
    local recap=$root$home/boma-qvm/target/setup-check.log
    log "inside: second apply: $(grep -E '^localhost +: ok=' "$recap" | tr -s ' ')"
    grep -E '^localhost +: ok=[0-9]+ +changed=0 +unreachable=0 +failed=0 ' "$recap" >/dev/null \
        || die "the second apply changed something"
    log "inside: /etc/boma-qvm/config.env:"
    grep -v '^#' "$root/etc/boma-qvm/config.env" >&2

    # As .ci/run: only the system PATH and HOME (a sudo user goes through sudo, whose
    # secure_path is that PATH: the runbook says to run it as root or through sudo).
    log "inside: as $AS: env -i PATH=<system> HOME=$home $sudo boma-qvm doctor"
    as_user "cd / && exec env -i PATH=$SYS_PATH HOME=$home $sudo boma-qvm doctor"
    log "inside: as $AS: env -i PATH=<system> HOME=$home $sudo boma-qvm doctor --boot-test"
    as_user "cd / && exec env -i PATH=$SYS_PATH HOME=$home $sudo boma-qvm doctor --boot-test"
    # Nothing of boma-qvm's may outlive the doctor (this namespace's processes, by its /proc;
    # zombies aside: this shell is PID 1 and reaps orphans only between commands). A VM's
    # detached supervisor may take a moment to exit after `down`: 10 s.
    leftovers() {
        local left= p i
        for i in $(seq 1 50); do
            left=
            for p in "$root"/proc/[0-9]*; do
                [ "$(awk '{print $3}' "$p/stat" 2>/dev/null)" = Z ] && continue
                grep -qE '^(qemu-system|dnsmasq|boma-qvm)' "$p/comm" 2>/dev/null \
                    && left+="$(basename "$p"): $(tr '\0' ' ' <"$p/cmdline" 2>/dev/null); "
            done
            [ -z "$left" ] && break
            sleep 0.2
        done
        printf '%s' "$left"
    }
    local left
    left=$(leftovers)
    [ -z "$left" ] || die "left running 10 s after doctor: $left"

    if [ "$NET" = 1 ]; then
        log "inside: as $AS: tests/host/net-check.sh (up the test guest on boma-qvm's network)"
        as_user "cd ~/boma-qvm && exec env -i PATH=$SYS_PATH HOME=$home $sudo bash tests/host/net-check.sh"
        [ -z "$(leftovers)" ] || die "left running after the net check: $(leftovers)"
    fi

    if [ "$IMAGE_BUILD" = 1 ]; then
        # The main job's first stage on this release: the golden image, built by .ci/setup
        # with this release's debootstrap (no VM boots).
        log "inside: as $AS: $sudo boma-qvm image list"
        as_user "cd / && exec env -i PATH=$SYS_PATH HOME=$home $sudo boma-qvm image list" >&2
    fi
    log "inside: all passed"
}

# ---------------------------------------------------------------------------------------------
# Outside: check, cache the minbase tarball, start the namespaces, wire their network, clean up.
outer() {
BIN=${1:?usage: tests/host/debian13.sh BIN (a built boma-qvm)}
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, namespaces, chroot). Fix: run it as root"
case "$AS" in root | user) ;; *) die "HOSTTEST_AS=$AS: want root or user" ;; esac
[ -x "$BIN" ] && [ -f "$BIN" ] || die "BIN=$BIN is not an executable file. Fix: build it (cargo build) or pass BIN=/path/to/boma-qvm"
BIN=$(realpath "$BIN")
for t in debootstrap unshare slirp4netns git tar chroot; do
    command -v "$t" >/dev/null || die "$t is missing. Fix: apt-get install ${t/unshare/util-linux}"
done
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    [ -z "$(git -C "$repo" status --porcelain --untracked-files=no)" ] \
        || log "note: uncommitted changes in $repo are NOT tested (the copy is git archive HEAD)"
fi

start=$SECONDS
mkdir -p "$CACHE"
chmod 0700 "$CACHE"
tarball=$CACHE/$SUITE-minbase.tar.gz
if [ ! -s "$tarball" ]; then
    log "building $tarball: debootstrap --variant=minbase $SUITE from $MIRROR (once; kept for reuse)"
    t=$SECONDS
    # In a tmpfs of a private mount namespace: nothing is written to disk but the tarball.
    unshare --mount --propagation private bash -euo pipefail -c '
        root=$(mktemp -d /tmp/boma-d13-bootstrap.XXXXXX)
        trap "umount -R \"\$root\" 2>/dev/null || true; rmdir \"\$root\"" EXIT
        mount -t tmpfs -o size=2g,mode=0755 boma-d13-bootstrap "$root"
        debootstrap --variant=minbase "$1" "$root" "$2" >"$3.debootstrap.log" 2>&1 \
            || { tail -n 20 "$3.debootstrap.log" >&2; exit 1; }
        # Sources as the Debian installer writes them: the release, its updates, security.
        rm -f "$root/etc/apt/sources.list"
        cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $2
Suites: $1 $1-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${2%/debian}/debian-security
Suites: $1-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        chroot "$root" apt-get clean
        rm -rf "$root"/var/lib/apt/lists/* "$root/etc/resolv.conf" "$root/etc/hostname"
        tar --numeric-owner -C "$root" -czf "$3.tmp" .
        mv "$3.tmp" "$3"
    ' _ "$SUITE" "$MIRROR" "$tarball"
    log "cached $tarball ($(du -h "$tarball" | cut -f1)) in $((SECONDS - t)) s"
else
    log "reusing $tarball ($(du -h "$tarball" | cut -f1); delete it to bootstrap afresh)"
fi

work=$(mktemp -d /tmp/boma-d13.XXXXXX)
ns_pid= slirp_pid=
cleanup() {
    local rc=$?
    [ -n "$slirp_pid" ] && kill "$slirp_pid" 2>/dev/null || true
    # unshare --kill-child: when unshare dies, its child (PID 1 of the namespace) gets SIGKILL,
    # and with it every process in the PID namespace; the mount namespace (tmpfs, binds) goes too.
    # SIGKILL: unshare --fork ignores SIGTERM and SIGINT while it waits for its child.
    if [ -n "$ns_pid" ] && kill -0 "$ns_pid" 2>/dev/null; then
        kill -KILL "$ns_pid" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
    rm -rf "$work"
    if [ "$rc" -eq 0 ]; then
        log "PASS in $((SECONDS - start)) s"
    else
        log "FAIL (exit $rc) after $((SECONDS - start)) s"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A clean copy, as a fresh clone would have it: git archive HEAD (without git: the tree,
# minus target/ and .git).
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$repo" archive --format=tar HEAD >"$work/repo.tar"
    what=$(git -C "$repo" rev-parse --short HEAD)
else
    tar -C "$repo" --exclude=./target --exclude=./.git -cf "$work/repo.tar" .
    what="$repo (not a git checkout)"
fi
log "testing $what with BIN=$BIN ($("$BIN" --version))"
mkdir "$work/root"

unshare --mount --propagation private --pid --fork --kill-child --net --uts --ipc \
    env SUITE="$SUITE" HOSTTEST_CACHE="$CACHE" HOSTTEST_TMPFS_SIZE="$TMPFS_SIZE" HOSTTEST_AS="$AS" HOSTTEST_IMAGE_BUILD="$IMAGE_BUILD" HOSTTEST_NET="$NET" \
    bash "$here/debian13.sh" --inner "$work" "$BIN" &
ns_pid=$!
# The namespace's network: user-mode NAT through this machine's sockets, once the netns exists.
for _ in $(seq 1 100); do
    [ "$(readlink "/proc/$ns_pid/ns/net" 2>/dev/null)" != "$(readlink /proc/self/ns/net)" ] && break
    sleep 0.05
done
slirp_up "$ns_pid" "$work/slirp.log"
nsenter -t "$ns_pid" -n ip link set lo up
touch "$work/net-ready"
wait "$ns_pid"
}

# Both halves are functions, parsed whole before anything runs: a checkout that changes this
# file under a running test cannot change what it does.
if [ "${1:-}" = --inner ]; then
    shift
    inner "$@"
    exit 0
fi
outer "$@"
