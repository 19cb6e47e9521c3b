#!/usr/bin/env bash
# The cluster key's cost on `strata up` (3 replicas): keyless vs keyed, fio over NBD, alternating.
# Each job prints its rate and the CPU the strata process (controller and 3 replicas) spent per MiB
# moved (user + system, from /proc; fio's own CPU not counted).
# Usage: BIN=target/release/strata bash scripts/key-cost.sh  (uses 127.0.0.1:10809-10811 and /tmp/kc-data; about 5 min)
#        ROUNDS=3 MODES="keyed" RT=12 to change the rounds, the modes and the seconds per job.
set -euo pipefail
BIN=${BIN:-target/release/strata}
key=/tmp/bench.key
[ -f $key ] || $BIN key init --out $key
tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
job() { # pid name rw bs qd
  local before after
  before=$(cpu_ticks $1)
  fio --ioengine=nbd --uri=nbd://127.0.0.1:10809/strata --name=$2 --rw=$3 --bs=$4 --iodepth=$5 \
      --size=1G --time_based --runtime=${RT:-12} --ramp_time=2 --output-format=json 2>/dev/null > /tmp/kc-fio.json
  after=$(cpu_ticks $1)
  python3 - "$before" "$after" "$tck" <<'PY'
import json, sys
s = open('/tmp/kc-fio.json').read()
d = json.loads(s[s.index('{'):])['jobs'][0]
iops = d['read']['iops'] + d['write']['iops']
mib = (d['read']['io_bytes'] + d['write']['io_bytes']) / (1 << 20)  # bytes, ramp excluded
run = d['job_runtime'] / 1000
# The CPU was counted over the ramp (2 s) and the run: its share of the run, per MiB.
cpu = (int(sys.argv[2]) - int(sys.argv[1])) / int(sys.argv[3]) * run / (run + 2)
bw = (d['read']['bw'] + d['write']['bw']) / 1024
print(f"{iops:.0f} IOPS {bw:.1f} MiB/s {cpu / mib * 1000 if mib else 0:.2f} ms CPU/MiB", end='')
PY
}
for round in $(seq ${ROUNDS:-2}); do
  for mode in ${MODES:-keyless keyed}; do
    rm -rf /tmp/kc-data
    if [ $mode = keyed ]; then export STRATA_CLUSTER_KEY_FILE=$key; else unset STRATA_CLUSTER_KEY_FILE; fi
    $BIN up --size 2G --data-dir /tmp/kc-data --replicas 3 >/tmp/kc-up-$mode.log 2>&1 &
    pid=$!
    for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/10809) 2>/dev/null && break; sleep 0.2; done
    fio --ioengine=nbd --uri=nbd://127.0.0.1:10809/strata --name=fill --rw=write --bs=1m --iodepth=8 --size=1G >/dev/null 2>&1
    echo "round $round $mode: 1M write QD8 $(job $pid w write 1m 8); 1M read QD8 $(job $pid r read 1m 8); 4K randwrite QD32 $(job $pid rw randwrite 4k 32); 4K randread QD32 $(job $pid rr randread 4k 32)"
    kill -TERM $pid; wait $pid || true
  done
done
