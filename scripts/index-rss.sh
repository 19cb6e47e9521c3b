#!/usr/bin/env bash
# Replica RSS with a fragmented or a contiguous volume (issue 22): one
# `strata replica serve` under one controller on loopback, fio writing 2 GiB
# through NBD, then both restarted so the replica rebuilds its index at open.
#
#   scripts/index-rss.sh BIN fragmented|contiguous
#
# fragmented: every other 4 KiB block of 2 GiB (262,144 extents);
# contiguous: 2 GiB in 1 MiB writes. Prints the replica's RSS (MiB) when
# idle, after fio, and after the restart, and the index size the replica
# reports where the binary has it (`strata volume status --json`).
set -euo pipefail
BIN=$(realpath "$1")
PATTERN=$2
case "$PATTERN" in
fragmented) FIO_ARGS=(--rw=write:4k --bs=4k) ;;
contiguous) FIO_ARGS=(--rw=write --bs=1M) ;;
*) echo "pattern: fragmented or contiguous" >&2; exit 2 ;;
esac
BASE=$((20000 + RANDOM % 20000))
REPLICA=127.0.0.1:$BASE NBD=127.0.0.1:$((BASE + 1))
CONTROL=127.0.0.1:$((BASE + 2)) METRICS=127.0.0.1:$((BASE + 3))
DIR=$(mktemp -d /tmp/index-rss.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] && { cat "$DIR"/*.log; } || true
    rm -rf "$DIR"
}
trap cleanup EXIT

rss_mib() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

wait_for() { # until `strata volume status` answers, at most 30 s
    for _ in $(seq 300); do
        "$BIN" volume status --controller "$CONTROL" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "controller did not come up" >&2
    return 1
}

start() {
    "$BIN" replica serve --dir "$DIR/replica" --listen "$REPLICA" >>"$DIR/replica.log" 2>&1 &
    RPID=$!
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/${REPLICA%:*}/${REPLICA#*:}") 2>/dev/null && break
        sleep 0.1
    done
    "$BIN" controller serve --volume v --replica "$REPLICA" --nbd "$NBD" \
        --control "$CONTROL" --metrics "$METRICS" --create-size 4G >>"$DIR/controller.log" 2>&1 &
    CPID=$!
    PIDS=("$RPID" "$CPID")
    wait_for
}

stop() {
    kill -TERM "$CPID" "$RPID"
    wait "$CPID" "$RPID" 2>/dev/null || true
}

index_bytes() {
    "$BIN" volume status --controller "$CONTROL" --json 2>/dev/null |
        grep -o '"index_bytes"[^,}]*' | head -1 || true
}

start
echo "$PATTERN: replica idle RSS $(rss_mib "$RPID") MiB"
fio --name=index-rss --ioengine=nbd --uri="nbd://$NBD" "${FIO_ARGS[@]}" --size=2G \
    --iodepth=16 >"$DIR/fio.log" 2>&1
echo "$PATTERN: replica RSS after fio $(rss_mib "$RPID") MiB $(index_bytes)"
stop
start
echo "$PATTERN: replica RSS after restart $(rss_mib "$RPID") MiB $(index_bytes)"
