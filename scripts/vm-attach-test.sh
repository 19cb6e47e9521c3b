#!/usr/bin/env bash
# The kernel-side attach test: a Debian 6.1 kernel under QEMU (TCG; this
# machine's kernel has no nbd module and its KVM does not boot stock
# kernels) attaches a strata volume served from this host with the kernel's
# nbd driver over netlink (`strata volume attach --supervise`), puts ext4 on
# it and runs fio with verify=crc32c while the host kills the controller
# with SIGKILL and restarts it 3 s later. fio must see no error, dmesg no IO
# error, the filesystem must stay read-write. Then the supervisor is
# restarted, the volume grown (`strata volume expand`) and the controller
# killed once more: the new supervisor reconnects and its RECONFIGURE
# carries the new size; resize2fs grows the mounted ext4. The device is
# detached, attached again and fsck'd. A last phase grows an nbdkit export
# the same way and checks that `attach --supervise` exits after a detach.
#
# The guest prints STRATA-VM-RESULT: PASS or FAIL on the serial console;
# this script checks it. Everything is bounded by `timeout`.
#
# Usage: bash scripts/vm-attach-test.sh   (root; STRATA_BIN=path/to/strata
# to test another build; the kernel and the initramfs base are cached in
# ${STRATA_CACHE:-~/.cache/strata}/kernel-<version>/).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
STRATA_BIN="${STRATA_BIN:-$PWD/target/release/strata}"
CACHE="${STRATA_CACHE:-$HOME/.cache/strata}"
VM_TIMEOUT="${VM_TIMEOUT:-420}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

[ -x "$STRATA_BIN" ] || { echo "vm-attach-test: no strata binary at $STRATA_BIN (cargo build --release --bin strata)"; exit 1; }

# --- host packages ------------------------------------------------------
need=()
for tool in busybox:busybox-static cpio:cpio fio:fio nbdkit:nbdkit mkfs.ext4:e2fsprogs python3:python3; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
[ -x /bin/busybox ] && file /bin/busybox 2>/dev/null | grep -q dynamic && need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    # All three qemu packages in one line at Debian 12's 7.2 build: installing
    # qemu-system-x86 alone next to a qemu-utils backport removes qemu-utils.
    $SUDO apt-get update -qq
    V=$(apt-cache madison qemu-utils | awk -F'|' '/bookworm\/main/{gsub(/ /,"",$2); print $2; exit}')
    echo "== installing: qemu-system-x86=$V qemu-utils=$V qemu-block-extra=$V"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --allow-downgrades --no-install-recommends \
        "qemu-system-x86=$V" "qemu-utils=$V" "qemu-block-extra=$V" >/dev/null
fi

# --- kernel (cached by version) -----------------------------------------
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$KPKG" ]; then
    # No apt metadata: use the newest cached kernel.
    KPKG=$(ls -d "$CACHE"/kernel-[0-9]* 2>/dev/null | sort -V | tail -1 | sed "s|.*/kernel-|linux-image-|")
fi
[ -n "$KPKG" ] || { echo "vm-attach-test: cannot find the linux-image-amd64 kernel package"; exit 1; }
KDIR="$CACHE/kernel-${KPKG#linux-image-}"
mkdir -p "$KDIR"
if ! ls "$KDIR"/kimg/boot/vmlinuz-* >/dev/null 2>&1; then
    echo "== downloading $KPKG"
    (cd "$KDIR" && ls "$KPKG"_*.deb >/dev/null 2>&1 || apt-get download "$KPKG" 2>/dev/null)
    (cd "$KDIR" && rm -rf kimg.tmp && dpkg-deb -x "$KPKG"_*.deb kimg.tmp && mv kimg.tmp kimg)
fi
VMLINUZ=$(ls "$KDIR"/kimg/boot/vmlinuz-* | head -1)
KVER=${VMLINUZ##*/vmlinuz-}
echo "== kernel $KVER"

# copy_bin ROOT BINARY...: the binaries and every library ldd lists.
copy_bin() {
    local root=$1; shift
    local b lib
    for b in "$@"; do
        mkdir -p "$root$(dirname "$b")"
        cp -L "$b" "$root$b"
        for lib in $(ldd "$b" 2>/dev/null | grep -o '/[^ ]*'); do
            [ -e "$root$lib" ] && continue
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    done
}

# --- initramfs base (cached): busybox, modules, e2fsprogs, fio ----------
TOOLS="$(command -v mkfs.ext4) $(command -v e2fsck) $(command -v resize2fs) $(command -v fio)"
BASE_KEY=$( (echo "$KVER v3"; for t in $TOOLS /bin/busybox; do sha256sum "$t"; done) | sha256sum | cut -c1-12)
BASE="$KDIR/initrd-base-$BASE_KEY.cpio.gz"
if [ ! -s "$BASE" ]; then
    echo "== building the initramfs base ($BASE)"
    B=$(mktemp -d)
    mkdir -p "$B"/{bin,sbin,proc,sys,dev,run,tmp,mnt,lib/modules,etc}
    cp /bin/busybox "$B/bin/busybox"
    # ext4 is a module in Debian's kernel; its dependencies by hand (the
    # package has no modules.dep): crc16, mbcache, jbd2, and crc32c for the
    # metadata checksums.
    for m in drivers/block/nbd.ko drivers/net/ethernet/intel/e1000/e1000.ko lib/crc16.ko \
             fs/mbcache.ko fs/jbd2/jbd2.ko crypto/crc32c_generic.ko fs/ext4/ext4.ko; do
        cp "$KDIR/kimg/lib/modules/$KVER/kernel/$m" "$B/lib/modules/"
    done
    # shellcheck disable=SC2086
    copy_bin "$B" $TOOLS
    echo "root:x:0:0:root:/root:/bin/sh" > "$B/etc/passwd"
    ln -s /proc/mounts "$B/etc/mtab"
    (cd "$B" && find . | cpio -o -H newc --quiet | gzip -1) > "$BASE.tmp" && mv "$BASE.tmp" "$BASE"
    rm -rf "$B"
fi

# --- host side: three replicas, a controller, an nbdkit export ----------
WORK=$(mktemp -d /tmp/strata-vm.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}" ${CTRL_PID:-} ${QEMU_PID:-}; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "(work dir kept: $WORK)"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
VOL=vmvol
REPLICA_ARGS=()
for i in 1 2 3; do
    p=$(free_port); mkdir -p "$WORK/r$i"
    "$STRATA_BIN" replica serve --dir "$WORK/r$i" --listen "127.0.0.1:$p" > "$WORK/replica$i.log" 2>&1 &
    PIDS+=($!)
    REPLICA_ARGS+=(--replica "127.0.0.1:$p")
done
NBD_PORT=$(free_port); CTL_PORT=$(free_port); MET_PORT=$(free_port)
CTRL_CMD=("$STRATA_BIN" controller serve --volume "$VOL" "${REPLICA_ARGS[@]}" --nbd "127.0.0.1:$NBD_PORT"
          --control "127.0.0.1:$CTL_PORT" --metrics "127.0.0.1:$MET_PORT" --create-size 128M)
start_controller() {
    "${CTRL_CMD[@]}" >> "$WORK/controller.log" 2>&1 &
    CTRL_PID=$!
}
wait_port() {
    local i
    for i in $(seq 1 100); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
sleep 0.3
start_controller
wait_port "$NBD_PORT" || { echo "vm-attach-test: controller did not start"; cat "$WORK/controller.log"; exit 1; }
# An nbdkit export the host can grow (the online-resize phase).
GROW_PORT=$(free_port)
truncate -s 64M "$WORK/grow.img"
start_nbdkit() {
    nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p "$GROW_PORT" file "$WORK/grow.img" >> "$WORK/nbdkit.log" 2>&1 &
    NBDKIT_PID=$!
    PIDS+=("$NBDKIT_PID")
}
start_nbdkit
wait_port "$GROW_PORT" || { echo "vm-attach-test: nbdkit did not start"; exit 1; }

# --- per-run initramfs layer: strata, the test script -------------------
T="$WORK/top"
mkdir -p "$T/bin"
strip -o "$WORK/strata" "$STRATA_BIN"
copy_bin "$T" "$WORK/strata"
mv "$T$WORK/strata" "$T/bin/strata"
cat > "$T/params" <<EOF
NBD_PORT=$NBD_PORT
GROW_PORT=$GROW_PORT
VOL=$VOL
EOF
cat > "$T/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /run
insmod /lib/modules/e1000.ko; insmod /lib/modules/nbd.ko nbds_max=4
for m in crc16 mbcache jbd2 crc32c_generic ext4; do insmod /lib/modules/$m.ko; done
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
sh /test.sh
echo "STRATA-VM: test script exited ($?)"
poweroff -f
EOF
cat > "$T/test.sh" <<'EOF'
. /params
export STRATA_LOG=info NO_COLOR=1
URI="nbd://10.0.2.2:$NBD_PORT/$VOL"
say() { echo "STRATA-VM: $*"; }
fail() {
    echo "STRATA-VM-RESULT: FAIL $*"
    for f in /tmp/*.log; do echo "--- $f"; tail -20 "$f"; done
    dmesg | tail -40
    poweroff -f
}
# wait_for FILE PATTERN SECS
wait_for() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt $(($3 * 10)) ] && return 1; sleep 0.1
    done
}
say "kernel $(uname -r), attaching $URI"
strata volume attach "$URI" --supervise --dead-timeout-secs 60 --io-timeout-secs 4 \
    > /tmp/attach.out 2> /tmp/sup1.log &
SUP=$!
wait_for /tmp/attach.out /dev/ 30 || fail "attach printed no device"
DEV=$(head -1 /tmp/attach.out)
grep -q "via kernel-nbd" /tmp/sup1.log || fail "attach did not take the kernel nbd path"
say "attached $DEV ($(cat /sys/block/${DEV#/dev/}/size) sectors)"
# The typed refusals, with the kernel path available; none leaves a device.
expect_refusal() {  # WHAT PATTERN ARGS...
    what=$1; pattern=$2; shift 2
    strata volume attach "$@" > /tmp/refusal.out 2> /tmp/refusal.log && fail "$what: attach succeeded"
    grep -q "$pattern" /tmp/refusal.log || fail "$what: $(cat /tmp/refusal.log)"
    say "refused as expected ($what): $(tail -1 /tmp/refusal.log)"
}
expect_refusal "already attached" "already attached" "$URI"
expect_refusal "device in use" "already in use" "nbd://10.0.2.2:$GROW_PORT/" --index 0
expect_refusal "missing export" "has no export" "nbd://10.0.2.2:$NBD_PORT/nope"
expect_refusal "no controller" "Cannot reach the controller" "nbd://10.0.2.2:1/$VOL"
[ "$(ls /run/strata/attach/*.json | wc -l)" -eq 1 ] || fail "state files after the refusals: $(ls /run/strata/attach)"
mkfs.ext4 -q -F "$DEV" || fail "mkfs"
mount "$DEV" /mnt || fail "mount"
say "fio start"
fio --name=verify --filename=/mnt/data --size=16M --bs=4k --rw=randwrite --ioengine=psync --direct=1 \
    --verify=crc32c --verify_backlog=64 --verify_fatal=1 --time_based --runtime=30 \
    --output-format=json --output=/tmp/fio.json > /tmp/fio.log 2>&1 &
FIO=$!
sleep 8
say "KILL-CONTROLLER"
wait $FIO; RC=$?
say "FIO-JSON-BEGIN"; cat /tmp/fio.json; echo; say "FIO-JSON-END"
[ $RC -eq 0 ] || fail "fio exited $RC: $(cat /tmp/fio.log)"
grep -q "reconnected" /tmp/sup1.log || fail "the supervisor did not reconnect"
grep " /mnt " /proc/mounts | grep -q " rw[ ,]" || fail "the filesystem is not read-write: $(grep ' /mnt ' /proc/mounts)"
dmesg | grep -E "I/O error|EXT4-fs error|Remounting filesystem read-only|critical medium error" && fail "IO errors in dmesg"
say "reconnect seen: $(grep reconnected /tmp/sup1.log | tail -1)"

# Restart the supervisor: the device stays attached, a new one finds it.
kill $SUP; wait $SUP
[ -b "$DEV" ] || fail "$DEV vanished with the supervisor"
strata volume attachments > /tmp/list.out || fail "attachments"
grep -q "$DEV .*kernel-nbd .*attached" /tmp/list.out || fail "attachments does not show $DEV: $(cat /tmp/list.out)"
strata volume supervise --probe-interval-secs 2 2> /tmp/sup2.log &
SUP2=$!
wait_for /tmp/sup2.log "supervising" 20 || fail "the restarted supervisor did not pick up $DEV"
say "KILL-CONTROLLER-2"
wait_for /tmp/sup2.log "LINK_DEAD" 30 || fail "no LINK_DEAD after the second kill"
fio --name=after --filename=/mnt/after --size=4M --bs=64k --rw=write --ioengine=psync --direct=1 \
    --verify=crc32c --verify_fatal=1 > /tmp/fio2.log 2>&1 || fail "fio after the supervisor restart: $(cat /tmp/fio2.log)"
wait_for /tmp/sup2.log "reconnected" 30 || fail "the restarted supervisor did not reconnect"
dmesg | grep -E "I/O error|EXT4-fs error|Remounting filesystem read-only" && fail "IO errors in dmesg"
say "second restart ridden out by the restarted supervisor"
# The host grew the volume before that restart: the reconnect's RECONFIGURE
# carried the new size (NBD_ATTR_SIZE_BYTES) with the new socket.
NEWSIZE=$(cat /sys/block/${DEV#/dev/}/size)
[ "$NEWSIZE" -eq $((192 * 2048)) ] || fail "after strata volume expand + reconnect $DEV shows $NEWSIZE sectors"
grep -q "device resized" /tmp/sup2.log || fail "the supervisor did not log the resize"
resize2fs "$DEV" > /tmp/resize1.log 2>&1 || fail "resize2fs on the grown strata volume: $(cat /tmp/resize1.log)"
dd if="$DEV" of=/dev/null bs=4096 skip=$((NEWSIZE / 8 - 1)) count=1 iflag=direct 2> /tmp/dd1.log \
    || fail "reading the last block of the grown device: $(cat /tmp/dd1.log)"
dmesg | grep -E "I/O error|EXT4-fs error" && fail "IO errors after the grow"
say "strata volume grown online: 262144 -> $NEWSIZE sectors; $(grep -o 'is now [0-9]* (4k) blocks' /tmp/resize1.log)"

umount /mnt || fail "umount"
strata volume detach "$DEV" || fail "detach"
wait_for /tmp/sup2.log "no longer supervising" 20 || fail "the supervisor did not notice the detach"
kill $SUP2
strata volume attach "$URI" > /tmp/attach2.out 2> /tmp/attach2.log || fail "attach again"
DEV2=$(head -1 /tmp/attach2.out)
e2fsck -fn "$DEV2" > /tmp/fsck.log 2>&1 || fail "e2fsck: $(cat /tmp/fsck.log)"
say "fsck clean on $DEV2"
# Grow the volume with no restart: strata's controller checks requests
# against its live size, so refresh-size can apply the new size over the
# connection the device has (RECONFIGURE with NBD_ATTR_SIZE_BYTES).
say "GROW-STRATA"
i=0
while [ "$(cat /sys/block/${DEV2#/dev/}/size)" -ne $((256 * 2048)) ]; do
    i=$((i + 1)); [ $i -gt 60 ] && fail "refresh-size never showed 256 MiB: $(cat /tmp/refresh2.log)"
    strata volume refresh-size "$DEV2" --server-serves-new-size > /tmp/refresh2.out 2> /tmp/refresh2.log
    sleep 0.5
done
dd if=/dev/urandom of=/tmp/last bs=4096 count=1 2>/dev/null
dd if=/tmp/last of="$DEV2" bs=4096 seek=$((256 * 256 - 1)) count=1 oflag=direct 2> /tmp/dd2.log \
    || fail "writing the last block after refresh-size: $(cat /tmp/dd2.log)"
dd if="$DEV2" of=/tmp/last.back bs=4096 skip=$((256 * 256 - 1)) count=1 iflag=direct 2>> /tmp/dd2.log \
    || fail "reading the last block after refresh-size: $(cat /tmp/dd2.log)"
cmp -s /tmp/last /tmp/last.back || fail "the last block read back differs"
dmesg | grep -E "I/O error" && fail "IO errors after refresh-size"
say "strata volume grown with no reconnect: $(cat /sys/block/${DEV2#/dev/}/size) sectors, last block written and read"
strata volume detach "$DEV2" || fail "detach again"
[ "$(strata volume attachments | wc -l)" -eq 1 ] || fail "attachments left: $(strata volume attachments)"

# Online growth of another server's export: nbdkit fixes a connection's
# size at its handshake, so the host restarts it after growing the file:
# the kernel sees the connection die, the supervisor reconnects and its
# RECONFIGURE carries the new size (NBD_ATTR_SIZE_BYTES) with the socket.
GURI="nbd://10.0.2.2:$GROW_PORT/"
strata volume attach "$GURI" --supervise > /tmp/attach3.out 2> /tmp/sup3.log &
SUP3=$!
wait_for /tmp/attach3.out /dev/ 30 || fail "attach the nbdkit export"
GDEV=$(head -1 /tmp/attach3.out)
mkfs.ext4 -q -F -b 4096 "$GDEV" && mount "$GDEV" /mnt || fail "mkfs/mount the nbdkit export"
echo before-grow > /mnt/before && sync
BEFORE=$(cat /sys/block/${GDEV#/dev/}/size)
say "GROW-EXPORT"
i=0
while [ "$(cat /sys/block/${GDEV#/dev/}/size)" = "$BEFORE" ]; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "the device never showed the new size ($BEFORE sectors)"
    sleep 0.1
done
AFTER=$(cat /sys/block/${GDEV#/dev/}/size)
grep -q "device resized" /tmp/sup3.log || fail "the supervisor did not log the resize"
resize2fs "$GDEV" > /tmp/resize.log 2>&1 || fail "resize2fs: $(cat /tmp/resize.log)"
say "online grow: $BEFORE -> $AFTER sectors; $(grep -o 'is now [0-9]* (4k) blocks' /tmp/resize.log)"
strata volume refresh-size "$GDEV" > /tmp/refresh.out 2> /tmp/refresh.log || fail "refresh-size: $(cat /tmp/refresh.log)"
grep -q " $((AFTER * 512))\$" /tmp/refresh.out || fail "refresh-size reported $(cat /tmp/refresh.out)"
dd if=/dev/zero of=/mnt/fill bs=1M count=70 conv=fsync 2> /tmp/dd.log || fail "writing past the old size: $(cat /tmp/dd.log)"
dmesg | grep -E "I/O error|EXT4-fs error" && fail "IO errors after the grow"
umount /mnt && strata volume detach "$GDEV" || fail "detach the nbdkit export"
wait_for /tmp/sup3.log "supervisor exits" 20 || fail "attach --supervise did not exit after detach"
echo "STRATA-VM-RESULT: PASS"
EOF
chmod +x "$T/init"
(cd "$T" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/top.cpio.gz"
cat "$BASE" "$WORK/top.cpio.gz" > "$WORK/initrd.gz"

# --- boot and drive the test --------------------------------------------
CONSOLE="$WORK/console.log"
echo "== booting $KVER under TCG (console: $CONSOLE)"
: > "$CONSOLE"
timeout "$VM_TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -m 768 -smp 1 -nographic -no-reboot \
    -kernel "$VMLINUZ" -initrd "$WORK/initrd.gz" -append "console=ttyS0 panic=-1 quiet" \
    -netdev user,id=n0 -device e1000,netdev=n0 < /dev/null > "$CONSOLE" 2>&1 &
QEMU_PID=$!
handled=""
restart_controller() {
    local t0 t1
    t0=$(date +%s.%N)
    kill -9 "$CTRL_PID"; wait "$CTRL_PID" 2>/dev/null || true
    echo "== controller killed (SIGKILL); restarting in 3 s"
    sleep 3
    start_controller
    wait_port "$NBD_PORT" || { echo "vm-attach-test: the controller did not come back"; tail -20 "$WORK/controller.log"; }
    t1=$(date +%s.%N)
    echo "== controller back after $(python3 -c "print(f'{$t1-$t0:.1f}')") s"
}
while kill -0 "$QEMU_PID" 2>/dev/null; do
    for marker in KILL-CONTROLLER KILL-CONTROLLER-2 GROW-STRATA GROW-EXPORT; do
        case " $handled " in *" $marker "*) continue ;; esac
        if grep -q "STRATA-VM: $marker\$" <(tr -d '\r' < "$CONSOLE"); then
            handled="$handled $marker"
            case $marker in
                KILL-CONTROLLER) restart_controller ;;
                KILL-CONTROLLER-2)
                    # Grow the volume online first: the guest's device follows
                    # when its connection is replaced (the restart below).
                    "$STRATA_BIN" volume expand "$VOL" 192M --controller "127.0.0.1:$CTL_PORT" \
                        > "$WORK/expand.log" 2>&1 || { echo "vm-attach-test: expand failed"; cat "$WORK/expand.log"; }
                    echo "== volume expanded to 192 MiB"
                    restart_controller ;;
                GROW-STRATA)
                    "$STRATA_BIN" volume expand "$VOL" 256M --controller "127.0.0.1:$CTL_PORT" \
                        > "$WORK/expand2.log" 2>&1 || { echo "vm-attach-test: expand failed"; cat "$WORK/expand2.log"; }
                    echo "== volume expanded to 256 MiB (no restart)" ;;
                GROW-EXPORT)
                    # nbdkit fixes each connection's size at its handshake:
                    # stop it, grow the file, start it again on the same port.
                    kill -9 "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true
                    truncate -s 96M "$WORK/grow.img"
                    start_nbdkit
                    echo "== nbdkit export grown to 96 MiB (nbdkit restarted)" ;;
            esac
        fi
    done
    sleep 0.2
done
wait "$QEMU_PID" && QRC=0 || QRC=$?
QEMU_PID=""
tr -d '\r' < "$CONSOLE" | grep -v -e '^{' -e '^ ' -e '^}' | grep -E "STRATA-VM|FAIL|error|Error" | grep -v FIO-JSON || true
# fio's write latencies across the controller restart.
tr -d '\r' < "$CONSOLE" | sed -n '/STRATA-VM: FIO-JSON-BEGIN/,/STRATA-VM: FIO-JSON-END/p' | sed '1d;$d' > "$WORK/fio.json"
python3 - "$WORK/fio.json" <<'PY' || true
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index('{'):])
job = j["jobs"][0]
for kind in ("write", "read"):
    d = job[kind]
    c = d["clat_ns"]
    p = c.get("percentile", {})
    pick = lambda k: p.get(k, 0) / 1e6
    print(f"fio {kind}: {d['total_ios']} IOs, {d['iops']:.0f} IOPS, clat ms: median {pick('50.000000'):.2f} "
          f"p99 {pick('99.000000'):.2f} p99.9 {pick('99.900000'):.2f} p99.99 {pick('99.990000'):.2f} "
          f"max {c['max']/1e6:.0f}; fio error {job['error']}")
PY
echo "== VM test run time: $(( $(date +%s) - START )) s (qemu exit $QRC)"
if tr -d '\r' < "$CONSOLE" | grep -q "^STRATA-VM-RESULT: PASS"; then
    echo "== vm-attach-test: PASS"
else
    echo "== vm-attach-test: FAIL"
    tail -60 "$CONSOLE"
    echo "--- controller log"; tail -20 "$WORK/controller.log"
    exit 1
fi
