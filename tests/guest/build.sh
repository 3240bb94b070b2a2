#!/usr/bin/env bash
# Build the busybox test guest: a Debian kernel (unpacked with dpkg -x) and an initramfs whose
# busybox init prints markers on the serial console, handles the ACPI power button, runs a DHCP
# client and a tiny command service. Boots to its marker in seconds under TCG.
#
# usage: build.sh OUTDIR      -> OUTDIR/vmlinuz, OUTDIR/initrd.img, OUTDIR/STAMP
# Cached: does nothing when OUTDIR/STAMP matches this script's hash.
set -euo pipefail
out=${1:?usage: build.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
stamp=$(cat "$0" "$here"/rootfs/* | sha256sum | cut -c1-16)
if [ -f "$out/STAMP" ] && [ "$(cat "$out/STAMP")" = "$stamp" ]; then exit 0; fi

for t in apt-get dpkg gzip; do
  command -v "$t" >/dev/null || { echo "build.sh: $t is missing (apt-get install dpkg gzip)" >&2; exit 3; }
done
bb=$(command -v busybox || true)
[ -n "$bb" ] && file_is_static=$(ldd "$bb" 2>&1 | grep -c 'not a dynamic' || true) || file_is_static=0
[ "${file_is_static:-0}" -ge 1 ] || { echo "build.sh: a static busybox is needed: apt-get install busybox-static" >&2; exit 3; }

mkdir -p "$out"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The kernel: whatever linux-image-amd64 points at in this machine's Debian release.
kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "build.sh: cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 3; }
(cd "$work" && apt-get download -q "$kpkg" >/dev/null 2>&1) || { echo "build.sh: apt-get download $kpkg failed" >&2; exit 3; }
dpkg -x "$work"/"$kpkg"_*.deb "$work/k"
kver=${kpkg#linux-image-}
# Debian 12's kernel packages ship /lib/modules; Debian 13's (merged /usr) ship /usr/lib/modules.
moddir=
for d in "$work/k/usr/lib/modules/$kver" "$work/k/lib/modules/$kver"; do
  [ -d "$d" ] && { moddir=$d; break; }
done
[ -n "$moddir" ] || { echo "build.sh: $kpkg has no modules in /usr/lib/modules/$kver or /lib/modules/$kver" >&2; exit 3; }

# Modules and their dependencies, in load order.
declare -A seen=()
order=()
add_mod() {
  local name=$1 path deps d
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  path=$(find "$moddir" -name "$name.ko" -o -name "$name.ko.xz" | head -1)
  [ -n "$path" ] || return 0   # built in
  # The modinfo depends= line, read from the module itself (decompressed: Debian 13's are .ko.xz).
  case "$path" in
    *.xz) deps=$("$bb" xzcat "$path" | "$bb" strings | sed -n "s/^depends=//p" | head -1 | tr "," " ") ;;
    *) deps=$("$bb" strings "$path" | sed -n "s/^depends=//p" | head -1 | tr "," " ") ;;
  esac
  for d in $deps; do add_mod "$d"; done
  order+=("$path")
}
# pvpanic-mmio: the ISA pvpanic device QEMU gets (ACPI QEMU0001), so a panic is a GUEST_PANICKED event.
for m in virtio_pci virtio_blk virtio_net virtio-rng button evdev pvpanic-mmio; do add_mod "$m"; done

root="$work/root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,lib/modules,usr/share/udhcpc,var/run,mnt}
cp "$bb" "$root/bin/busybox"
for a in $("$bb" --list); do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done
for a in init poweroff reboot halt; do ln -sf ../bin/busybox "$root/sbin/$a"; done
: > "$root/lib/modules/load-order"
for p in "${order[@]}"; do
  f=$(basename "$p"); f=${f%.xz}
  # busybox's xzcat, not xz: xz-utils is not on a minimal Debian 13 (whose modules are .ko.xz).
  case "$p" in *.xz) "$bb" xzcat "$p" > "$root/lib/modules/$f" ;; *) cp "$p" "$root/lib/modules/$f" ;; esac
  echo "$f" >> "$root/lib/modules/load-order"
done
cp "$here"/rootfs/inittab "$root/etc/inittab"
cp "$here"/rootfs/rcS "$root/etc/rcS"
cp "$here"/rootfs/rc.shutdown "$root/etc/rc.shutdown"
cp "$here"/rootfs/udhcpc.script "$root/usr/share/udhcpc/default.script"
mkdir -p "$root/etc/acpi/PWRF"
cp "$here"/rootfs/power-button "$root/etc/acpi/PWRF/00000080"
chmod +x "$root/etc/rcS" "$root/etc/rc.shutdown" "$root/etc/acpi/PWRF/00000080" "$root/usr/share/udhcpc/default.script"
ln -sf /bin/busybox "$root/init"

cp "$work/k/boot/vmlinuz-$kver" "$work/vmlinuz"
(cd "$root" && find . | "$bb" cpio -o -H newc 2>/dev/null | gzip -1) > "$work/initrd.img"
mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/initrd.img" "$out/initrd.img"
echo "$stamp" > "$out/STAMP"
echo "test guest: kernel $kver, $(du -h "$out/initrd.img" | cut -f1) initramfs in $out"
