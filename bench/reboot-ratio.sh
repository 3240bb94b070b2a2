#!/usr/bin/env bash
# Clean reboot over QMP vs the guest's own reboot, on one running VM, same image, same host.
#
# usage: bench/reboot-ratio.sh HOST [N]
#   The VM boma-it-HOST must be up with SSH (e.g. `boma-qvm up HOST --image built`).
#   BOMA_QVM: the binary (default: boma-qvm); BOMA_QVM_STATE_DIR etc. as for boma-qvm.
#
# Alternates N times (so load on a shared machine hits both alike):
#   clean: `boma-qvm reboot HOST`      (ACPI power button -> the guest's shutdown -> QMP reset)
#   guest: `boma-qvm ssh HOST -- sudo systemctl reboot`
# Before each sample the guest finishes booting (`systemctl is-system-running --wait`), so neither
# kind of reboot interrupts services still starting. Each sample runs from the command to SSH
# answering with a new boot_id, and also shows its shutdown half from the VM's events.jsonl:
# POWERDOWN->SHUTDOWN (clean), command->RESET (guest; QEMU's timestamps and `date` share the host
# clock). Ends with the medians and clean/guest. On a shared machine, note the load: a busy host
# stretches every boot, and the two kinds of reboot alike only on average.
set -euo pipefail
host=${1:?usage: bench/reboot-ratio.sh HOST [N]}
n=${2:-3}
bq=${BOMA_QVM:-boma-qvm}
state=${BOMA_QVM_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/boma-qvm}
vm=$host; [[ $vm == boma-it-* ]] || vm=boma-it-$host
events=$state/vms/$vm/events.jsonl
[ -f "$events" ] || { echo "no $events: is $vm up (and BOMA_QVM_STATE_DIR the one it was started with)?" >&2; exit 4; }

settle() { "$bq" ssh "$host" -- systemctl is-system-running --wait >/dev/null 2>&1 || true; }
boot_id() { "$bq" ssh "$host" -- cat /proc/sys/kernel/random/boot_id 2>/dev/null; }
now() { date +%s.%N; }

# Wait until SSH answers with a boot_id other than $1; print the seconds since $2.
back() {
  local before=$1 t0=$2 id deadline=$(( $(date +%s) + 900 ))
  while :; do
    id=$(boot_id || true)
    if [ -n "$id" ] && [ "$id" != "$before" ]; then
      awk -v a="$(now)" -v b="$t0" 'BEGIN { printf "%.1f", a - b }'
      return
    fi
    [ "$(date +%s)" -lt "$deadline" ] || { echo "no SSH with a new boot_id after 900 s" >&2; exit 9; }
    sleep 2
  done
}

# The shutdown half, from the records after line $1 of events.jsonl: POWERDOWN->SHUTDOWN for a
# clean reboot; for the guest's own reboot, from $2 (the command) to its first RESET.
shutdown_half() {
  tail -n +"$(( $1 + 1 ))" "$events" | python3 -c '
import json, sys
r = [json.loads(l) for l in sys.stdin if l.strip()]
ts = lambda e: next(x["ts"] for x in r if x["event"] == e)
print("%.1f" % ((ts("SHUTDOWN") - ts("POWERDOWN")) if sys.argv[1] == "" else (ts("RESET") - float(sys.argv[1]))))' "${2:-}"
}

boot_id >/dev/null || { echo "\`$bq ssh $host\` does not work: is $vm up (inside the network namespace it was started in, if any)?" >&2; exit 11; }

clean=() guest=()
for i in $(seq 1 "$n"); do
  settle
  before=$(boot_id)
  lines=$(wc -l < "$events")
  t0=$(now)
  "$bq" reboot "$host" >/dev/null 2>&1
  s=$(back "$before" "$t0")
  clean+=("$s")
  printf 'clean %d: %6.1f s to SSH (POWERDOWN->SHUTDOWN %s s)\n' "$i" "$s" "$(shutdown_half "$lines")"

  settle
  before=$(boot_id)
  lines=$(wc -l < "$events")
  t0=$(now)
  "$bq" ssh "$host" -- sudo systemctl reboot >/dev/null 2>&1 || true
  s=$(back "$before" "$t0")
  guest+=("$s")
  printf 'guest %d: %6.1f s to SSH (command->RESET %s s)\n' "$i" "$s" "$(shutdown_half "$lines" "$t0")"
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
mc=$(median "${clean[@]}") mg=$(median "${guest[@]}")
printf 'median clean %.1f s, guest %.1f s, clean/guest %.2f (n=%d each)\n' "$mc" "$mg" "$(awk -v a="$mc" -v b="$mg" 'BEGIN { print a / b }')" "$n"
