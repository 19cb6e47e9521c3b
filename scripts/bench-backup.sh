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
# (`strata up`, 3 replicas) through the controller, as users do.
#
# Usage: bash scripts/bench-backup.sh [WORKDIR]   (default bench-out/backup)
# Needs: python3, curl, restic (apt-get install restic), cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-$ROOT/bench-out/backup}
rm -rf "$WORK"; mkdir -p "$WORK"
command -v restic >/dev/null || { echo "restic is not installed (apt-get install restic)" >&2; exit 1; }

. scripts/s3-servers.sh
export STRATA_MOTO_PORT=${STRATA_MOTO_PORT:-9400} STRATA_S3SFS_PORT=${STRATA_S3SFS_PORT:-9401}
s3_start "$WORK/servers" >/dev/null
trap 's3_stop "$WORK/servers"' EXIT
EP=$STRATA_S3_MOTO_ENDPOINT
curl -s -o /dev/null -X PUT "$EP/bench"

echo "== building"
cargo build --release --quiet -p strata-backup --example bench_backup
BENCH=$ROOT/target/release/examples/bench_backup

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

# run NAME CMD...: wall seconds and peak RSS into $WORK/NAME.time, stdout into $WORK/NAME.out
run() {
    local name=$1; shift
    /usr/bin/time -f "%e %M" -o "$WORK/$name.time" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
        echo "$name failed:" >&2; cat "$WORK/$name.err" >&2; exit 1; }
}
secs() { cut -d' ' -f1 "$WORK/$1.time"; }
rss() { echo $(( $(cut -d' ' -f2 "$WORK/$1.time") / 1024 )); }
json() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])[sys.argv[2]])" "$WORK/$1.out" "$2"; }

echo "== strata"
T=s3://bench/strata
run s_full "$BENCH" backup $T vol "$WORK/layer1.img"
run s_inc "$BENCH" backup $T vol "$WORK/layer1.img,$WORK/layer2.img"
ID=$(json s_inc id)
run s_restore "$BENCH" restore $T "$ID" "$WORK/strata-restored.img"
cmp "$WORK/strata-restored.img" "$WORK/full2.img" && echo "strata restore matches the image"
S_FULL_UP=$(json s_full bytes_uploaded); S_INC_UP=$(json s_inc bytes_uploaded)

echo "== strata, live volume: strata up (3 replicas), backups through the controller"
cargo build --release --quiet --bin strata
STRATA=$ROOT/target/release/strata
CTL=127.0.0.1:${STRATA_BENCH_CONTROL_PORT:-10920}
NBD=nbd://127.0.0.1:${STRATA_BENCH_NBD_PORT:-10919}/strata
"$STRATA" up --size 4G --data-dir "$WORK/up" --nbd "127.0.0.1:${STRATA_BENCH_NBD_PORT:-10919}" \
    --control "$CTL" --metrics "127.0.0.1:${STRATA_BENCH_METRICS_PORT:-10921}" >"$WORK/up.log" 2>&1 &
UP_PID=$!
trap 'kill $UP_PID 2>/dev/null || true; s3_stop "$WORK/servers"' EXIT
for _ in $(seq 1 100); do "$STRATA" volume status --controller "$CTL" >/dev/null 2>&1 && break; sleep 0.2; done
# Only the allocated parts of the images are written (the volume starts zeroed).
nbdcopy --destination-is-zero "$WORK/full1.img" "$NBD"
hwm() { echo $(( $(awk '/VmHWM/{print $2}' /proc/$UP_PID/status) / 1024 )); }
UP_RSS_WRITE=$(hwm)
L=s3://bench/live
run l_full "$STRATA" backup create strata --target $L --controller "$CTL" --json
nbdcopy --destination-is-zero "$WORK/layer2.img" "$NBD"
run l_inc "$STRATA" backup create strata --target $L --controller "$CTL" --json
jget() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$WORK/$1.out" "$2"; }
LID=$(jget l_inc id)
run l_restore "$STRATA" backup restore "$LID" --to-file "$WORK/live-restored.img" --target $L --json
cmp "$WORK/live-restored.img" "$WORK/full2.img" && echo "live restore matches the image"
L_FULL_UP=$(jget l_full bytes_uploaded); L_INC_UP=$(jget l_inc bytes_uploaded)
UP_RSS=$(hwm)
kill -INT $UP_PID; wait $UP_PID || true

echo "== restic"
R=s3:$EP/bench/restic
cp --sparse=always "$WORK/full1.img" "$WORK/disk.img"
run r_init restic -r $R init
run r_full restic -r $R backup --json "$WORK/disk.img"
cp --sparse=always "$WORK/full2.img" "$WORK/disk.img"
run r_inc restic -r $R backup --json "$WORK/disk.img"
mkdir -p "$WORK/restic-restore"
run r_restore restic -r $R restore latest --target "$WORK/restic-restore"
cmp "$WORK/restic-restore$WORK/disk.img" "$WORK/full2.img" && echo "restic restore matches the image"
rsum() { python3 -c "
import json,sys
for l in open(sys.argv[1]):
    try: m = json.loads(l)
    except ValueError: continue
    if m.get('message_type') == 'summary': print(m['data_added'])" "$WORK/$1.out"; }
R_FULL_UP=$(rsum r_full); R_INC_UP=$(rsum r_inc)

mib() { python3 -c "print(f'{int(\"$1\")/1048576:.1f}')"; }
{
printf "%-22s %12s %12s %10s\n" "" "strata" "restic" "ratio"
row() { printf "%-22s %12s %12s %10s\n" "$1" "$2" "$3" "$(python3 -c "print(f'{float(\"$3\")/max(float(\"$2\"),1e-9):.1f}x')")"; }
row "full backup (s)" "$(secs s_full)" "$(secs r_full)"
row "full uploaded (MiB)" "$(mib $S_FULL_UP)" "$(mib $R_FULL_UP)"
row "full peak RSS (MiB)" "$(rss s_full)" "$(rss r_full)"
row "incr backup (s)" "$(secs s_inc)" "$(secs r_inc)"
row "incr uploaded (MiB)" "$(mib $S_INC_UP)" "$(mib $R_INC_UP)"
row "incr peak RSS (MiB)" "$(rss s_inc)" "$(rss r_inc)"
row "restore (s)" "$(secs s_restore)" "$(secs r_restore)"
row "restore peak RSS (MiB)" "$(rss s_restore)" "$(rss r_restore)"
echo "(ratio = restic / strata; uploaded = bytes after compression and encryption; restic's = data_added)"
echo
echo "live volume through the controller (strata up, 3 replicas; CLI process RSS, and the"
echo "strata up process's peak RSS over the whole run including writing the data):"
printf "%-22s %12s %12s %10s\n" "" "strata live" "restic" "ratio"
row "full backup (s)" "$(secs l_full)" "$(secs r_full)"
row "full uploaded (MiB)" "$(mib $L_FULL_UP)" "$(mib $R_FULL_UP)"
row "incr backup (s)" "$(secs l_inc)" "$(secs r_inc)"
row "incr uploaded (MiB)" "$(mib $L_INC_UP)" "$(mib $R_INC_UP)"
row "restore (s)" "$(secs l_restore)" "$(secs r_restore)"
row "restore peak RSS (MiB)" "$(rss l_restore)" "$(rss r_restore)"
echo "strata up peak RSS: $UP_RSS_WRITE MiB after writing the data, $UP_RSS MiB after the backups (controller + 3 replicas, one process)"
} | tee "$RES"
