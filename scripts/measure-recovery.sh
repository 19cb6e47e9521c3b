#!/usr/bin/env bash
# Measures recovery on this machine: a 4 GiB volume with 3 replicas, 1 GiB
# written while replica 0 is out; then the delta resync time, a full rebuild
# (replica 0 wiped) without a client and one while a client writes 4 KiB
# random blocks at QD16 all along, each with its MiB/s against the disk's
# own sequential write rate (measured at the start, and again just before
# each rebuild), and the client's IOPS during the rebuild as a fraction of
# its IOPS without one.
# SLOW_DISK_MIB=N puts replica 0 (the one resynced and rebuilt) and the
# disk measurement on a disk capped at N MiB/s (scripts/slow-disk.sh:
# nbdkit's rate filter under ext4; needs root, nbdkit, nbdfuse): a disk
# whose rate holds still, as an SD card's or a small cloud volume's does,
# where this machine's virtual disk measures anything from 280 to 1855 MiB/s.
# Usage: bash scripts/measure-recovery.sh (needs fio; STRATA_BIN=path skips the build).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/openssl-env.sh
if [ -z "${STRATA_BIN:-}" ]; then
    cargo build --release --quiet --bin strata
fi
BIN=${STRATA_BIN:-$PWD/target/release/strata}
W=$(mktemp -d)
SLOW=${SLOW_DISK_MIB:-}
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -z "$SLOW" ] || bash scripts/slow-disk.sh down "$W/slow"; rm -rf "$W"' EXIT
# Where replica 0 keeps its data and where the disk's rate is measured.
D0=$W
if [ -n "$SLOW" ]; then
    D0=$(bash scripts/slow-disk.sh up "$W/slow" "$SLOW" 3G)
fi
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
R=($(port) $(port) $(port)); NBD=$(port); CTL=$(port); MET=$(port)
declare -a PIDS
dir_of() { if [ "$1" = 0 ]; then echo "$D0/r0"; else echo "$W/r$1"; fi; }
start_replica() { "$BIN" replica serve --dir "$(dir_of $1)" --listen 127.0.0.1:${R[$1]} 2>>"$W/r$1.log" & PIDS[$1]=$!; sleep 0.5; }
for i in 0 1 2; do start_replica $i; done
"$BIN" controller serve --volume vol --create-size 4G --nbd 127.0.0.1:$NBD --control 127.0.0.1:$CTL --metrics 127.0.0.1:$MET \
  --replica 127.0.0.1:${R[0]} --replica 127.0.0.1:${R[1]} --replica 127.0.0.1:${R[2]} 2>"$W/ctl.log" &
sleep 1
URI=nbd://127.0.0.1:$NBD/vol
state() { "$BIN" volume status --json --controller 127.0.0.1:$CTL | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }
wait_healthy() { local t0=$(date +%s.%N); while [ "$(state)" != healthy ]; do sleep 0.1; done; python3 -c "print(f'{$(date +%s.%N)-$t0:.2f}')"; }
# The controller's own time for the last sync (rejoin to healthy), without
# the seconds it took to notice the replica was back (reconnect backoff).
last_sync() { grep 'healthy again' "$W/ctl.log" | tail -1 | sed -E 's/\x1b\[[0-9;]*m//g'; }
sync_secs() { last_sync | sed -E 's/.*seconds="?([0-9.]+).*/\1/'; }
sync_mib() { last_sync | sed -E 's/.*mib_copied=([0-9]+).*/\1/'; }
iops() { fio --name=m --ioengine=nbd --uri=$URI --rw=randwrite --bs=4k --iodepth=16 --size=4G --time_based --runtime=$1 --output-format=json 2>/dev/null \
  | sed -n '/^{/,$p' | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'; }

disk_rate() {
    fio --name=disk --filename="$D0/disk.raw" --rw=write --bs=1M --size=1G --end_fsync=1 --output-format=json 2>/dev/null \
      | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["bw"]/1024))'
    rm -f "$D0/disk.raw"
}
disk=$(disk_rate)
base=$(iops 5)
kill -9 ${PIDS[0]} 2>/dev/null; wait ${PIDS[0]} 2>/dev/null || true; sleep 0.5
fio --name=fill --ioengine=nbd --uri=$URI --rw=write --bs=1M --iodepth=8 --size=1G --output-format=terse >/dev/null 2>&1
start_replica 0
delta=$(wait_healthy); delta_sync=$(sync_secs); delta_mib=$(sync_mib)
# This machine's virtual disk measures anything from 280 to 1900 MiB/s,
# minutes apart: each rebuild is also compared with a measurement taken
# just before it (replica 0 stopped, nothing else writing).
wipe() { kill -9 ${PIDS[0]}; wait ${PIDS[0]} 2>/dev/null || true; rm -rf "$(dir_of 0)"; sleep 0.5; }
wipe
quiet_disk=$(disk_rate)
start_replica 0
quiet=$(wait_healthy); quiet_sync=$(sync_secs); quiet_mib=$(sync_mib)
wipe
full_disk=$(disk_rate)
start_replica 0
t0=$(date +%s.%N)
fio --name=m --ioengine=nbd --uri=$URI --rw=randwrite --bs=4k --iodepth=16 --size=4G --time_based --runtime=600 \
  --output-format=json >"$W/during.json" 2>/dev/null &
FIO=$!
wait_healthy >/dev/null; full_sync=$(sync_secs); full_mib=$(sync_mib)
full=$(python3 -c "print(f'{$(date +%s.%N)-$t0:.2f}')")
kill -INT $FIO; wait $FIO 2>/dev/null || true
during=$(sed -n '/^{/,$p' "$W/during.json" | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["write"]; print(round(j["io_bytes"]/4096/max(j["runtime"],1)*1000))')
rate() { python3 -c "print(round(${2:-1024}/$1))"; }
pct() { python3 -c "print(round(${2:-1024}/$1/${3:-$disk}*100))"; }
echo "disk sequential write (fio, 1 MiB, end_fsync${SLOW:+; replica 0 on a disk capped at $SLOW MiB/s}): ${disk} MiB/s"
echo "Each row: the copy (the controller's rejoin-to-healthy time, the MiB it copied) and, in brackets, the replica's start to healthy (adds the controller's reconnect backoff) for 1 GiB."
echo "delta resync after 1 GiB written while out: ${delta_sync} s for ${delta_mib} MiB ($(rate $delta_sync $delta_mib) MiB/s) [${delta} s]"
echo "full rebuild of 1 GiB allocated in a 4 GiB volume, no client: ${quiet_sync} s for ${quiet_mib} MiB ($(rate $quiet_sync $quiet_mib) MiB/s, $(pct $quiet_sync $quiet_mib)% of the disk's rate; $(pct $quiet_sync $quiet_mib $quiet_disk)% of the ${quiet_disk} MiB/s measured just before) [${quiet} s, $(pct $quiet)%]"
echo "full rebuild of 1 GiB allocated, client 4K randwrite QD16 all along: ${full_sync} s for ${full_mib} MiB ($(rate $full_sync $full_mib) MiB/s, $(pct $full_sync $full_mib)% of the disk's rate; $(pct $full_sync $full_mib $full_disk)% of the ${full_disk} MiB/s measured just before) [${full} s, $(pct $full)%]"
echo "client 4K randwrite QD16: ${base} IOPS without a rebuild, ${during} IOPS during it ($(python3 -c "print(round($during/$base*100))")%)"
