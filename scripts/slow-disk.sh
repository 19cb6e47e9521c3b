#!/usr/bin/env bash
# A slow disk for tests: a sparse file served by nbdkit's rate filter (a
# bandwidth cap on reads and writes together), made a file by nbdfuse,
# a block device by a loop device with 4 KiB sectors and direct IO, ext4 on
# it, mounted. Every step is bounded in time; `down` undoes all of it.
#
# Usage: bash scripts/slow-disk.sh up DIR MIB_PER_SEC [SIZE]   mounts DIR/mnt
#        bash scripts/slow-disk.sh down DIR
# Needs root, nbdkit, nbdfuse (libnbd-bin), fuse3, losetup and mkfs.ext4.
set -euo pipefail
cmd=$1 dir=$2

down() {
    if mountpoint -q "$dir/mnt"; then
        timeout 60 umount "$dir/mnt" || umount -l "$dir/mnt" || true
    fi
    if [ -f "$dir/loop" ]; then
        timeout 30 losetup -d "$(cat "$dir/loop")" 2>/dev/null || true
        rm -f "$dir/loop"
    fi
    if mountpoint -q "$dir/fuse"; then
        fusermount3 -u "$dir/fuse" 2>/dev/null || fusermount3 -uz "$dir/fuse" 2>/dev/null || true
    fi
    if [ -f "$dir/nbdfuse.pid" ]; then
        pid=$(cat "$dir/nbdfuse.pid")
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/nbdfuse.pid"
    fi
    rm -f "$dir/backing.img"
}

case "$cmd" in
up)
    rate=$3 size=${4:-2G}
    mkdir -p "$dir/fuse" "$dir/mnt"
    truncate -s "$size" "$dir/backing.img"
    # nbdfuse starts nbdkit itself (-s: NBD on its stdin) and forks into the
    # background once the file is there; unmounting ends both.
    setsid nbdfuse -P "$dir/nbdfuse.pid" "$dir/fuse/disk" \
        --command nbdkit -s --filter=rate file "$dir/backing.img" "rate=$((rate * 8 * 1048576))" \
        </dev/null >"$dir/nbdfuse.log" 2>&1 &
    for _ in $(seq 100); do [ -s "$dir/nbdfuse.pid" ] && [ -e "$dir/fuse/disk" ] && break; sleep 0.1; done
    if ! [ -e "$dir/fuse/disk" ]; then
        echo "slow-disk: nbdfuse did not start: $(cat "$dir/nbdfuse.log")" >&2
        down; exit 1
    fi
    # 4 KiB sectors: with 512-byte ones direct IO sends requests libnbd refuses.
    loop=$(timeout 30 losetup -f --show --direct-io=on --sector-size 4096 "$dir/fuse/disk")
    echo "$loop" >"$dir/loop"
    # No lazy init: its background zeroing would eat the disk's bandwidth.
    timeout 120 mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$loop"
    timeout 30 mount "$loop" "$dir/mnt"
    echo "$dir/mnt"
    ;;
down)
    down
    ;;
*)
    echo "usage: $0 up DIR MIB_PER_SEC [SIZE] | down DIR" >&2
    exit 2
    ;;
esac
