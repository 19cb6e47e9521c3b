#!/usr/bin/env bash
# Measures a full rebuild of scattered 4 KiB blocks only: a 4 GiB volume
# with 3 replicas, fio 4K randwrite QD16 for SCATTER_SECS (default 5)
# seconds, then replica 0 wiped and rebuilt without a client. Prints the
# controller's copy time, the MiB copied, and the CPU seconds the target,
# the source replicas and the controller spent on it (from /proc/PID/stat),
# the per-block cost that `scripts/measure-recovery.sh` mixes with a
# sequential 1 GiB. MODE=seq copies one sequential 1 GiB instead; MODE=both
# does both, as measure-recovery.sh does. (BENCHMARKS.md, "Session 20".)
# Usage: bash scripts/measure-scattered-copy.sh (needs fio; STRATA_BIN=path skips the build).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/openssl-env.sh
if [ -z "${STRATA_BIN:-}" ]; then
    cargo build --release --quiet --bin strata
fi
BIN=${STRATA_BIN:-$PWD/target/release/strata}
MODE=${MODE:-scatter}
case "$MODE" in scatter|seq|both) ;; *) echo "MODE must be scatter, seq or both, not $MODE" >&2; exit 2 ;; esac
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
R=($(port) $(port) $(port)); NBD=$(port); CTL=$(port)
declare -a PIDS
start_replica() { "$BIN" replica serve --dir "$W/r$1" --listen 127.0.0.1:${R[$1]} 2>>"$W/r$1.log" & PIDS[$1]=$!; sleep 0.5; }
for i in 0 1 2; do start_replica $i; done
"$BIN" controller serve --volume vol --create-size 4G --nbd 127.0.0.1:$NBD --control 127.0.0.1:$CTL \
  --replica 127.0.0.1:${R[0]} --replica 127.0.0.1:${R[1]} --replica 127.0.0.1:${R[2]} 2>"$W/ctl.log" &
CPID=$!
sleep 1
URI=nbd://127.0.0.1:$NBD/vol
state() { "$BIN" volume status --json --controller 127.0.0.1:$CTL | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }
if [ "$MODE" != seq ]; then
    fio --name=scatter --ioengine=nbd --uri=$URI --rw=randwrite --bs=4k --iodepth=16 --size=4G --time_based \
        --runtime="${SCATTER_SECS:-5}" --output-format=terse >/dev/null 2>&1
fi
if [ "$MODE" != scatter ]; then
    fio --name=fill --ioengine=nbd --uri=$URI --rw=write --bs=1M --iodepth=8 --size=1G --output-format=terse >/dev/null 2>&1
fi
sync; sleep 2
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
kill -9 "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; rm -rf "$W/r0"; sleep 0.5
ctl0=$(ticks $CPID); src1=$(ticks "${PIDS[1]}"); src2=$(ticks "${PIDS[2]}")
start_replica 0
deadline=$((SECONDS + 300))
while [ "$(state)" != healthy ]; do
    [ $SECONDS -lt $deadline ] || { echo "the rebuild did not end within 300 s" >&2; exit 1; }
    sleep 0.05
done
tgt=$(ticks "${PIDS[0]}"); ctl1=$(ticks $CPID); src1e=$(ticks "${PIDS[1]}"); src2e=$(ticks "${PIDS[2]}")
line=$(grep 'healthy again' "$W/ctl.log" | tail -1 | sed -E 's/\x1b\[[0-9;]*m//g')
secs=$(sed -E 's/.*seconds="?([0-9.]+).*/\1/' <<<"$line")
mib=$(sed -E 's/.*mib_copied=([0-9]+).*/\1/' <<<"$line")
python3 - "$MODE" "$secs" "$mib" "$(getconf CLK_TCK)" "$tgt" "$((src1e - src1 + src2e - src2))" "$((ctl1 - ctl0))" <<'PY'
import sys
mode, secs, mib, hz = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tgt, src, ctl = (int(x) / hz for x in sys.argv[5:8])
cpu = tgt + src + ctl
print(f"{mode}: copied {mib} MiB in {secs:.2f} s ({mib / secs:.0f} MiB/s); "
      f"CPU {cpu:.2f} s ({cpu / mib * 1000:.1f} ms per MiB): target {tgt:.2f}, sources {src:.2f}, controller {ctl:.2f}")
PY
