#!/usr/bin/env bash
# Run by tests/host/debian13.sh on the fresh root, as root (HOSTTEST_NET=1): boma-qvm's own
# network on this release's nft, dnsmasq and kernel tools. The busybox test guest is started
# with `up` on boma-qvm's bridge, gets a DHCP lease from boma-qvm's dnsmasq, and answers on its
# command service (TCP 7000) from the control node; then `down` and `net down` remove it all.
set -euo pipefail
vm=d13net
tg=$(ls -d /var/cache/boma-qvm/testguest-*/ | head -n1)
[ -n "$tg" ] || { echo "net-check: no built test guest in /var/cache/boma-qvm (doctor --boot-test builds it)" >&2; exit 1; }
trap 'boma-qvm down "$vm" >/dev/null 2>&1 || true; boma-qvm net down >/dev/null 2>&1 || true' EXIT
boma-qvm up "$vm" --kernel "${tg}vmlinuz" --initrd "${tg}initrd.img" \
    --append "console=ttyS0 boma.net=1" --cpus 1 --memory 256
ip= t=$SECONDS
while [ $((SECONDS - t)) -lt 120 ]; do
    ip=$(boma-qvm console "$vm" --log 2>/dev/null | sed -n 's/.*BOMA-TESTGUEST-IP \([0-9.]*\).*/\1/p' | tail -n1)
    [ -n "$ip" ] && break
    sleep 1
done
if [ -z "$ip" ]; then
    echo "net-check: FAIL: no DHCP lease in 120 s; console tail:" >&2
    boma-qvm console "$vm" --log 2>&1 | tail -n 20 >&2
    exit 1
fi
echo "net-check: lease $ip from boma-qvm's dnsmasq after $((SECONDS - t)) s"
said=$(timeout 30 bash -c "exec 3<>/dev/tcp/$ip/7000; echo 'uname -r; exit' >&3; cat <&3")
[ -n "$said" ] || { echo "net-check: FAIL: the guest's command service at $ip:7000 said nothing" >&2; exit 1; }
echo "net-check: the guest at $ip:7000 answered: $said"
nft list table inet boma_qvm >/dev/null
echo "net-check: nft table inet boma_qvm is loaded"
boma-qvm down "$vm"
boma-qvm net down
trap - EXIT
if nft list table inet boma_qvm >/dev/null 2>&1; then
    echo "net-check: FAIL: net down left the nft table inet boma_qvm" >&2
    exit 1
fi
echo "net-check: down and net down removed the VM, the bridge's nft table and dnsmasq"
