#!/usr/bin/env bash
# The cluster key's cost on `strata up` (3 replicas): keyless vs keyed, fio over NBD, alternating.
# Usage: BIN=target/release/strata bash scripts/key-cost.sh  (uses 127.0.0.1:10809-10811 and /tmp/kc-data; about 5 min)
set -euo pipefail
BIN=${BIN:-target/release/strata}
key=/tmp/bench.key
[ -f $key ] || $BIN key init --out $key
job() { # name rw bs qd
  fio --ioengine=nbd --uri=nbd://127.0.0.1:10809/strata --name=$1 --rw=$2 --bs=$3 --iodepth=$4 \
      --size=1G --time_based --runtime=${RT:-12} --ramp_time=2 --output-format=json 2>/dev/null |
    python3 -c "import json,sys; s=sys.stdin.read(); d=json.loads(s[s.index('{'):])['jobs'][0]; r=d['read']['iops']+d['write']['iops']; b=(d['read']['bw']+d['write']['bw'])/1024; print(f'{r:.0f} IOPS {b:.1f} MiB/s')"
}
for round in 1 2; do
  for mode in keyless keyed; do
    rm -rf /tmp/kc-data
    if [ $mode = keyed ]; then export STRATA_CLUSTER_KEY_FILE=$key; else unset STRATA_CLUSTER_KEY_FILE; fi
    $BIN up --size 2G --data-dir /tmp/kc-data --replicas 3 >/tmp/kc-up-$mode.log 2>&1 &
    pid=$!
    for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/10809) 2>/dev/null && break; sleep 0.2; done
    fio --ioengine=nbd --uri=nbd://127.0.0.1:10809/strata --name=fill --rw=write --bs=1m --iodepth=8 --size=1G >/dev/null 2>&1
    echo "round $round $mode: 1M write QD8 $(job w write 1m 8); 1M read QD8 $(job r read 1m 8); 4K randwrite QD32 $(job rw randwrite 4k 32); 4K randread QD32 $(job rr randread 4k 32)"
    kill -TERM $pid; wait $pid || true
  done
done
