#!/usr/bin/env bash
# libiscsi's iscsi-test-cu against strata and against tgtd (Debian `tgt`,
# a file-backed LUN), run the same way, plus iscsi-perf figures for both.
#
# Every suite of the ALL family (MultipathIO excepted: it needs two paths)
# runs in its own process with a timeout, with --dataloss. A test is
# "skip" when it passed while printing [SKIPPED] (libiscsi's way of saying
# the target does not implement what it needs), "pass" when it passed
# otherwise, "fail" when it failed or gave no result (hang, crash).
#
# Usage: bash scripts/iscsi-conformance.sh [strata|tgt|both]   (default both)
# Env:   STRATA_BIN (default target/release/strata, built if missing),
#        SIZE_MB (LUN size, default 128), OUT (default target/iscsi-conformance),
#        SUITE_TIMEOUT (seconds per suite, default 300), PERF_SECS (default 10).
# Needs: libiscsi-bin, tgt (tgtd, tgtadm). Listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/openssl-env.sh

WHICH=${1:-both}
SIZE_MB=${SIZE_MB:-128}
OUT=${OUT:-target/iscsi-conformance}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-300}
PERF_SECS=${PERF_SECS:-10}
BIN=${STRATA_BIN:-target/release/strata}

for t in iscsi-test-cu iscsi-perf; do
    command -v $t >/dev/null || { echo "$t is missing: apt-get install libiscsi-bin" >&2; exit 2; }
done
mkdir -p "$OUT"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # port seconds
    for _ in $(seq $(( $2 * 10 ))); do
        (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1 after $2 s" >&2
    return 1
}

# Runs every suite against URL; writes $OUT/NAME.tsv (test, result).
run_suites() { # name url
    local name=$1 url=$2 tsv="$OUT/$1.tsv"
    : > "$tsv"
    mkdir -p "$OUT/$name-logs"
    local suites
    suites=$(iscsi-test-cu --list | grep -E '^ALL\.[A-Za-z0-9]+$' | grep -v MultipathIO)
    for s in $suites; do
        local log="$OUT/$name-logs/$s.log"
        timeout -k 5 "$SUITE_TIMEOUT" iscsi-test-cu --dataloss -v -t "$s" "$url" > "$log" 2>&1 || true
        # Results from the verbose CUnit output.
        awk -v suite="$s" '
            function finish(r) { if (cur != "") { print suite "." cur "\t" r; seen[cur]=1 }; cur="" }
            function scan(text) {
                if (text ~ /^passed/) { finish(skip ? "skip" : "pass"); return }
                if (text ~ /^FAILED/) { finish("fail"); return }
                if (cur != "" && text ~ /\[SKIPPED\]/) skip=1
            }
            /^  Test: / { finish("fail"); cur=$2; skip=0; sub(/^  Test: [^ ]+ \.\.\./, ""); scan($0); next }
            { sub(/^ +$/, ""); scan($0) }
            END { finish("fail") }
        ' "$log" >> "$tsv"
        # Tests that never reported (a hang or a crash) count as failures.
        for t in $(iscsi-test-cu --list | grep -E "^$s\.[^.]+$"); do
            grep -q "^$t	" "$tsv" || printf '%s\tfail\n' "$t" >> "$tsv"
        done
    done
    printf '%-8s pass %3d  skip %3d  fail %3d  (of %d)\n' "$name" \
        "$(grep -c '	pass$' "$tsv")" "$(grep -c '	skip$' "$tsv")" "$(grep -c '	fail$' "$tsv")" "$(wc -l < "$tsv")" \
        | tee "$OUT/$name.counts"
}

# iscsi-perf: random 4 KiB reads, 32 in flight.
run_perf() { # name url blocks_per_4k
    local out
    out=$(timeout -k 5 $(( PERF_SECS + 30 )) iscsi-perf -m 32 -b "$3" -t "$PERF_SECS" -r "$2" 2>&1 | tr '\r' '\n' | grep -o 'iops average [0-9]* ([0-9]* MB/s)' | tail -1)
    printf '%-8s iscsi-perf -m 32 -r, 4 KiB reads, %s s: %s\n' "$1" "$PERF_SECS" "$out" | tee "$OUT/$1.perf"
}

if [ "$WHICH" = strata ] || [ "$WHICH" = both ]; then
    [ -x "$BIN" ] || cargo build --release --quiet --bin strata
    P=$(free_port); N=$(free_port); C=$(free_port); M=$(free_port)
    "$BIN" up --size "${SIZE_MB}M" --replicas 3 --data-dir "$WORK/strata" \
        --nbd 127.0.0.1:$N --control 127.0.0.1:$C --metrics 127.0.0.1:$M --iscsi 127.0.0.1:$P \
        > "$OUT/strata-server.log" 2>&1 &
    PIDS+=($!); disown
    wait_port "$P" 60
    URL="iscsi://127.0.0.1:$P/iqn.2026-11.io.strata:strata/0"
    run_suites strata "$URL"
    run_perf strata "$URL" 1
fi

if [ "$WHICH" = tgt ] || [ "$WHICH" = both ]; then
    command -v tgtd >/dev/null || { echo "tgtd is missing: apt-get install tgt" >&2; exit 2; }
    P=$(free_port); CTL=$(( 20000 + RANDOM % 10000 ))
    truncate -s "${SIZE_MB}M" "$WORK/tgt.img"
    tgtd -f -C "$CTL" --iscsi portal=127.0.0.1:$P > "$OUT/tgt-server.log" 2>&1 &
    PIDS+=($!); disown
    wait_port "$P" 30
    IQN=iqn.2026-11.io.strata:tgt
    tgtadm -C "$CTL" --lld iscsi --op new --mode target --tid 1 -T "$IQN"
    tgtadm -C "$CTL" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$WORK/tgt.img"
    tgtadm -C "$CTL" --lld iscsi --op bind --mode target --tid 1 -I ALL
    URL="iscsi://127.0.0.1:$P/$IQN/1"
    run_suites tgt "$URL"
    run_perf tgt "$URL" 8
fi

echo
echo "== $(date -u +%Y-%m-%dT%H:%MZ), libiscsi $(dpkg-query -W -f='${Version}' libiscsi-bin 2>/dev/null || echo '?'), LUN ${SIZE_MB} MiB"
cat "$OUT"/*.counts "$OUT"/*.perf 2>/dev/null
