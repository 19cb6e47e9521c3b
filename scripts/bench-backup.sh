#!/usr/bin/env bash
# Backup benchmark: strata-backup against Debian's restic, on one moto S3
# server, on the same data (the issue's "Done when"):
#   a 4 GiB sparse volume, 1 GiB written in 256 scattered 4 MiB pieces;
#   full backup; then 64 MiB changed (16 x 4 MiB at random offsets);
#   incremental backup; restore of the second backup.
# For each: wall time, bytes uploaded, peak RSS. Both encrypt.
#
# strata reads the volume as a stack of sparse layer files (how a replica
# keeps snapshots: the second layer holds only the 64 MiB written after the
# first snapshot), so its incremental backup reads only what changed.
# restic backs up the same volume as one raw image file and must re-read it.
#
# A second strata run backs up the same data written into a live volume
# (`strata up`, 3 replicas) through the controller, as users do, restores
# it to a file and into a second, new 3-replica volume (`backup restore --to`,
# checked by reading the volume back over NBD).
#
# Every row is run STRATA_BENCH_RUNS times (default 3), strata and restic
# alternating within each round, each round to fresh S3 prefixes; the table
# gives the median with the min and max in brackets, and ratios of medians.
#
# Usage: bash scripts/bench-backup.sh [WORKDIR]   (default bench-out/backup)
# Needs: python3, curl, restic (apt-get install restic), nbdcopy (libnbd-bin), cargo.
# STRATA_BIN and STRATA_BENCH_BIN (bench_backup) skip the build and run
# those binaries instead (e.g. an older build, for before/after figures).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/openssl-env.sh
ROOT=$PWD
WORK=${1:-$ROOT/bench-out/backup}
rm -rf "$WORK"; mkdir -p "$WORK"
command -v restic >/dev/null || { echo "restic is not installed (apt-get install restic)" >&2; exit 1; }

. scripts/s3-servers.sh
export STRATA_MOTO_PORT=${STRATA_MOTO_PORT:-9400}
s3_start_moto "$WORK/servers"
trap 's3_stop "$WORK/servers"' EXIT
EP=$STRATA_S3_MOTO_ENDPOINT
curl -s -o /dev/null -X PUT "$EP/bench"

RUNS=${STRATA_BENCH_RUNS:-3}
if [ -z "${STRATA_BIN:-}" ] || [ -z "${STRATA_BENCH_BIN:-}" ]; then
    echo "== building"
    cargo build --release --quiet -p strata-backup --example bench_backup
    cargo build --release --quiet --bin strata
fi
BENCH=${STRATA_BENCH_BIN:-$ROOT/target/release/examples/bench_backup}
STRATA=${STRATA_BIN:-$ROOT/target/release/strata}

echo "== making the data"
python3 - "$WORK" <<'PY'
import os, random, sys
w = sys.argv[1]; GiB = 1 << 30; MiB = 1 << 20; size = 4 * GiB
rnd = random.Random(42)
def sparse(p):
    f = open(p, "wb"); f.truncate(size); return f
l1, full, l2 = sparse(f"{w}/layer1.img"), sparse(f"{w}/full.img"), sparse(f"{w}/layer2.img")
for slot in range(256):                      # 1 GiB: 4 MiB in each 16 MiB slot
    off = slot * 16 * MiB + rnd.randrange(0, 12 * MiB // 4096) * 4096
    d = os.urandom(4 * MiB)
    for f in (l1, full):
        f.seek(off); f.write(d)
full.flush(); os.fsync(full.fileno())
os.system(f"cp --sparse=always {w}/full.img {w}/full1.img")
for i in range(16):                          # 64 MiB changed
    off = rnd.randrange(0, (size - 4 * MiB) // 4096) * 4096
    d = os.urandom(4 * MiB)
    for f in (l2, full):
        f.seek(off); f.write(d)
for f in (l1, full, l2): f.close()
PY
mv "$WORK/full.img" "$WORK/full2.img"
du -h --apparent-size "$WORK/full1.img" | sed 's/^/image size /'
du -h "$WORK/full1.img" "$WORK/layer2.img" | sed 's/^/allocated /'

export AWS_ACCESS_KEY_ID=k AWS_SECRET_ACCESS_KEY=s AWS_REGION=us-east-1
export STRATA_BACKUP_KEY=benchmark-key-0123456789abcdef RESTIC_PASSWORD=benchmark-password
export STRATA_S3_ENDPOINT=$EP STRATA_LOG=warn
RES=$WORK/results.txt; : >"$RES"
ROWS=$WORK/rows.tsv; : >"$ROWS"     # round, row, seconds, peak RSS MiB, uploaded bytes, S3 requests, moto CPU ticks

# run NAME CMD...: wall seconds and peak RSS into $WORK/NAME.time, stdout into $WORK/NAME.out.
# Every row starts with no dirty pages (`sync`): otherwise a row pays for the
# writeback of the one before it (the live restore right after the live
# backups waited for the 3 replicas' gigabytes of writes: 9.5 s against 5.6 s).
# Also counted per row: the S3 requests (moto logs one line per request)
# and moto's CPU time, into $WORK/NAME.s3. moto answers every request with
# `Connection: close` and starts a thread per connection, so each request
# costs it a few milliseconds whatever its size: the request count is what
# limits a restore on this server (BENCHMARKS.md).
MOTO_PID=$(cat "$WORK/servers/moto.pid")
moto_cpu() { awk '{print $14 + $15}' "/proc/$MOTO_PID/stat"; }
run() {
    local name=$1; shift
    sync
    local n0 c0
    n0=$(wc -l <"$WORK/servers/moto.log"); c0=$(moto_cpu)
    /usr/bin/time -f "%e %M" -o "$WORK/$name.time" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
        echo "$name failed:" >&2; cat "$WORK/$name.err" >&2; exit 1; }
    echo "$(( $(wc -l <"$WORK/servers/moto.log") - n0 )) $(( $(moto_cpu) - c0 ))" >"$WORK/$name.s3"
}
# record ROUND ROW NAME [UPLOADED]: one line of rows.tsv from NAME.time and NAME.s3
record() {
    printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$1" "$2" "$(cut -d' ' -f1 "$WORK/$3.time")" \
        "$(( $(cut -d' ' -f2 "$WORK/$3.time") / 1024 ))" "${4:-}" \
        "$(cut -d' ' -f1 "$WORK/$3.s3")" "$(cut -d' ' -f2 "$WORK/$3.s3")" >>"$ROWS"
}
json() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])[sys.argv[2]])" "$WORK/$1.out" "$2"; }
jget() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$WORK/$1.out" "$2"; }
rsum() { python3 -c "
import json,sys
for l in open(sys.argv[1]):
    try: m = json.loads(l)
    except ValueError: continue
    if m.get('message_type') == 'summary': print(m['data_added'])" "$WORK/$1.out"; }

# up DIR NBD_PORT CONTROL_PORT METRICS_PORT: a fresh 3-replica `strata up` volume in the background
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill $p 2>/dev/null || true; done; s3_stop "$WORK/servers"' EXIT
up() {
    rm -rf "$1"
    "$STRATA" up --size 4G --data-dir "$1" --nbd "127.0.0.1:$2" --control "127.0.0.1:$3" \
        --metrics "127.0.0.1:$4" >"$1.log" 2>&1 &
    UP=$!; PIDS+=("$UP")
    for _ in $(seq 1 100); do "$STRATA" volume status --controller "127.0.0.1:$3" >/dev/null 2>&1 && return 0; sleep 0.2; done
    echo "strata up in $1 did not start" >&2; cat "$1.log" >&2; exit 1
}
down() { kill -INT "$1"; wait "$1" || true; }
hwm() { echo $(( $(awk '/VmHWM/{print $2}' /proc/$1/status) / 1024 )); }

P=${STRATA_BENCH_NBD_PORT:-10919}
for r in $(seq 1 "$RUNS"); do
    echo "== round $r of $RUNS: strata (layer files)"
    T=s3://bench/strata-$r
    run s_full "$BENCH" backup $T vol "$WORK/layer1.img"
    record $r s_full s_full "$(json s_full bytes_uploaded)"
    run s_inc "$BENCH" backup $T vol "$WORK/layer1.img,$WORK/layer2.img"
    record $r s_inc s_inc "$(json s_inc bytes_uploaded)"
    ID=$(json s_inc id)
    rm -f "$WORK/strata-restored.img"
    run s_restore "$BENCH" restore $T "$ID" "$WORK/strata-restored.img"
    record $r s_restore s_restore
    cmp "$WORK/strata-restored.img" "$WORK/full2.img" && echo "strata restore matches the image"
    rm -f "$WORK/strata-restored.img"
    for f in s_full s_inc s_restore; do cp "$WORK/$f.out" "$WORK/$f.$r.out"; done

    echo "== round $r: strata live volume (strata up, 3 replicas), backups through the controller"
    up "$WORK/up" $P $((P + 1)) $((P + 2)); UP_A=$UP
    CTL=127.0.0.1:$((P + 1)); NBD=nbd://127.0.0.1:$P/strata
    # Only the allocated parts of the images are written (the volume starts zeroed).
    nbdcopy --destination-is-zero "$WORK/full1.img" "$NBD"
    UP_RSS_WRITE=$(hwm $UP_A)
    L=s3://bench/live-$r
    run l_full "$STRATA" backup create strata --target $L --controller "$CTL" --json
    record $r l_full l_full "$(jget l_full bytes_uploaded)"
    nbdcopy --destination-is-zero "$WORK/layer2.img" "$NBD"
    run l_inc "$STRATA" backup create strata --target $L --controller "$CTL" --json
    record $r l_inc l_inc "$(jget l_inc bytes_uploaded)"
    LID=$(jget l_inc id)
    UP_RSS=$(hwm $UP_A)
    down $UP_A
    rm -rf "$WORK/up"
    # The CLI's restore to a file runs after the volume stopped: run beside
    # it, the 3 replicas, still busy after the backups, took the 2 cores from
    # it (6.2-9.8 s against 5.6 s alone). In a cluster they are on other nodes.
    rm -f "$WORK/live-restored.img"
    run l_restore "$STRATA" backup restore "$LID" --to-file "$WORK/live-restored.img" --target $L --json
    record $r l_restore l_restore
    cmp "$WORK/live-restored.img" "$WORK/full2.img" && echo "live restore to a file matches the image"
    rm -f "$WORK/live-restored.img"
    # Into a second, new 3-replica volume, through its controller.
    up "$WORK/up2" $((P + 10)) $((P + 11)) $((P + 12)); UP_B=$UP
    run l_restore_vol "$STRATA" backup restore "$LID" --to strata --controller 127.0.0.1:$((P + 11)) --target $L --json
    record $r l_restore_vol l_restore_vol
    UP2_RSS=$(hwm $UP_B)
    nbdcopy "nbd://127.0.0.1:$((P + 10))/strata" "$WORK/volume-read.img"
    cmp "$WORK/volume-read.img" "$WORK/full2.img" && echo "restore into the volume matches the image"
    rm -f "$WORK/volume-read.img"
    down $UP_B
    rm -rf "$WORK/up2"
    printf "%s\tup_rss\t%s\t%s\t%s\t\t\n" $r "$UP_RSS_WRITE" "$UP_RSS" "$UP2_RSS" >>"$ROWS"
    for f in l_full l_inc l_restore l_restore_vol; do cp "$WORK/$f.out" "$WORK/$f.$r.out"; done

    echo "== round $r: restic"
    R=s3:$EP/bench/restic-$r
    cp --sparse=always "$WORK/full1.img" "$WORK/disk.img"
    run r_init restic -r $R init
    run r_full restic -r $R backup --json "$WORK/disk.img"
    record $r r_full r_full "$(rsum r_full)"
    cp --sparse=always "$WORK/full2.img" "$WORK/disk.img"
    run r_inc restic -r $R backup --json "$WORK/disk.img"
    record $r r_inc r_inc "$(rsum r_inc)"
    rm -rf "$WORK/restic-restore"; mkdir -p "$WORK/restic-restore"
    run r_restore restic -r $R restore latest --target "$WORK/restic-restore"
    record $r r_restore r_restore
    cmp "$WORK/restic-restore$WORK/disk.img" "$WORK/full2.img" && echo "restic restore matches the image"
    rm -rf "$WORK/restic-restore" "$WORK/disk.img"
done

python3 - "$ROWS" "$RUNS" <<'PY' | tee "$RES"
import os, statistics, sys
rows, runs = sys.argv[1], int(sys.argv[2])
t, rss, up, uprss, req, mcpu = {}, {}, {}, [], {}, {}
hz = os.sysconf("SC_CLK_TCK")
for line in open(rows):
    r, name, a, b, c, n, m = line.rstrip("\n").split("\t")
    if name == "up_rss":
        uprss.append((int(a), int(b), int(c)))
        continue
    t.setdefault(name, []).append(float(a)); rss.setdefault(name, []).append(int(b))
    if c:
        up.setdefault(name, []).append(int(c))
    req.setdefault(name, []).append(int(n)); mcpu.setdefault(name, []).append(int(m) / hz)
med = lambda v: statistics.median(v)
def cell(v, fmt):
    return f"{fmt(med(v))} ({fmt(min(v))}-{fmt(max(v))})" if len(v) > 1 else fmt(v[0])
sec = lambda x: f"{x:.2f}"
mib = lambda x: f"{x / 1048576:.1f}"
whole = lambda x: f"{x:.0f}"
W = 24
def row(label, s, r, vals, fmt, ratio=True):
    a, b = cell(vals[s], fmt), cell(vals[r], fmt)
    q = f"{med(vals[r]) / max(med(vals[s]), 1e-9):.2f}x" if ratio else ""
    print(f"{label:<24} {a:>{W}} {b:>{W}} {q:>8}")
print(f"median of {runs} runs (min-max); ratio = restic / strata (medians)")
print(f"{'':<24} {'strata':>{W}} {'restic':>{W}} {'ratio':>8}")
row("full backup (s)", "s_full", "r_full", t, sec)
row("full uploaded (MiB)", "s_full", "r_full", up, mib, False)
row("full peak RSS (MiB)", "s_full", "r_full", rss, whole, False)
row("full S3 requests", "s_full", "r_full", req, whole, False)
row("incr backup (s)", "s_inc", "r_inc", t, sec)
row("incr uploaded (MiB)", "s_inc", "r_inc", up, mib, False)
row("incr peak RSS (MiB)", "s_inc", "r_inc", rss, whole, False)
row("restore to file (s)", "s_restore", "r_restore", t, sec)
row("restore peak RSS (MiB)", "s_restore", "r_restore", rss, whole, False)
row("restore S3 requests", "s_restore", "r_restore", req, whole, False)
row("restore moto CPU (s)", "s_restore", "r_restore", mcpu, sec, False)
print("(uploaded = bytes after compression and encryption; restic's = data_added;")
print(" S3 requests and moto CPU: what the server did for the row)")
print()
print("live volume through the controller (strata up, 3 replicas; CLI process RSS):")
print(f"{'':<24} {'strata live':>{W}} {'restic':>{W}} {'ratio':>8}")
row("full backup (s)", "l_full", "r_full", t, sec)
row("full uploaded (MiB)", "l_full", "r_full", up, mib, False)
row("incr backup (s)", "l_inc", "r_inc", t, sec)
row("incr uploaded (MiB)", "l_inc", "r_inc", up, mib, False)
row("restore to file (s)", "l_restore", "r_restore", t, sec)
row("restore peak RSS (MiB)", "l_restore", "r_restore", rss, whole, False)
row("restore to volume (s)", "l_restore_vol", "r_restore", t, sec)
row("restore S3 requests", "l_restore_vol", "r_restore", req, whole, False)
w, a, b = zip(*uprss)
print(f"strata up peak RSS (controller + 3 replicas, one process): {cell(list(w), whole)} MiB after writing")
print(f"the data, {cell(list(a), whole)} MiB after the backups; the volume restored into: {cell(list(b), whole)} MiB")
PY
