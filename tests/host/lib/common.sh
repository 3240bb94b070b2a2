# Sourced by tests/host/*.sh after the caller sets TAG (its name in the log lines): the
# settings they share, and log/die.
SUITE=${SUITE:-trixie}
MIRROR=${BOMA_QVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${HOSTTEST_CACHE:-/var/cache/boma-qvm-hosttest}
SYS_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
log() { printf '%s %s-%s: %s\n' "$(date +%T)" "$TAG" "$SUITE" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# The one argument, BIN (the boma-qvm binary a test installs), made absolute in `bin`; and
# root, which these tests need (debootstrap, namespaces).
host_test_bin() {
    [ $# -eq 1 ] || die "usage: $0 BIN (the boma-qvm binary to install)"
    [ -x "$1" ] && [ -f "$1" ] || die "$1 is not an executable file. Fix: cargo build, then pass target/debug/boma-qvm"
    [ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, namespaces). Fix: run it as root"
    bin=$(realpath "$1")
}

# Give the network namespace of process $1 a way out: slirp4netns's user-mode NAT through this
# machine's sockets (tap0 with 10.0.2.100, a default route, DNS at 10.0.2.3). Its log is $2;
# sets `slirp_pid` (the caller's trap kills it). Waits up to 10 s for tap0.
slirp_up() {
    local pid=$1 logf=$2
    command -v slirp4netns >/dev/null \
        || env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slirp4netns >&2
    slirp4netns --configure --mtu=65520 --disable-host-loopback "$pid" tap0 >"$logf" 2>&1 &
    slirp_pid=$!
    for _ in $(seq 1 100); do
        nsenter -t "$pid" -n ip -o -4 addr show tap0 2>/dev/null | grep -q 10.0.2.100 && return 0
        sleep 0.1
    done
    die "slirp4netns did not configure tap0 in 10 s: $(tail -n 3 "$logf" | tr '\n' ' ')"
}

# Make the root at $1 a machine of this site behind slirp4netns: this machine's egress CA
# (installed when .ci/setup installs ca-certificates) and pip's config (pip trusts only
# certifi's bundle), as a site provisions them; slirp's DNS; hostname debian13-host.
site_root() {
    local root=$1 f
    mkdir -p "$root/usr/local/share/ca-certificates"
    for f in /usr/local/share/ca-certificates/*.crt; do
        [ -f "$f" ] && cp "$f" "$root/usr/local/share/ca-certificates/"
    done
    [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
    printf 'nameserver 10.0.2.3\n' >"$root/etc/resolv.conf"
    printf 'debian13-host\n' >"$root/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 debian13-host\n::1 localhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
}
