#!/usr/bin/env bash
# Checks the OCI archive scripts/build-image.sh wrote, with real tools and no
# container engine:
#   - skopeo (Debian) reads the archive by the name k3s would use, finds one
#     index with linux/amd64 and linux/arm64, and copies each platform into an
#     OCI layout (verifying every blob's digest on the way);
#   - umoci unpacks each platform to a root filesystem;
#   - the rootfs holds exactly the expected executables, owned by 0:0;
#   - the amd64 rootfs's binaries run in a chroot (its own loader and
#     libraries), the arm64 rootfs's under qemu-aarch64-static in a chroot:
#     strata --version, the tools' versions, and a real mkfs.ext4 + blkid +
#     resize2fs on a file, mkfs.xfs on a file;
#   - containerd (Debian's 1.6; k3s embeds containerd's importer) imports the
#     archive with `ctr images import --all-platforms` into a throwaway root
#     and lists the image by its name with both platforms; nothing is run.
# Usage: bash scripts/image-test.sh [ARCHIVE]   (default target/image/strata-image.oci.tar)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ARCHIVE=${1:-$ROOT/target/image/strata-image.oci.tar}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE_NAME=${IMAGE_NAME:-docker.io/strata/strata:$VERSION}
TAG=${IMAGE_NAME##*:}
die() { echo "image-test: FAIL: $*" >&2; exit 1; }
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
[ -s "$ARCHIVE" ] || die "no archive at $ARCHIVE (bash scripts/build-image.sh)"
[ "$(id -u)" = 0 ] || die "needs root (chroot)"

need=()
for t in skopeo:skopeo umoci:umoci qemu-aarch64-static:qemu-user-static jq:jq containerd:containerd; do
    command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

T=$(mktemp -d /tmp/strata-image-test.XXXXXX)
CTRD_PID=""
cleanup() {
    if [ -n "$CTRD_PID" ]; then kill "$CTRD_PID" 2>/dev/null || true; wait "$CTRD_PID" 2>/dev/null || true; fi
    for m in "$T"/bundle-*/rootfs/proc; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done
    rm -rf --one-file-system "$T"
}
trap cleanup EXIT
t0=$(date +%s)

echo "== the archive's index.json names the image for containerd"
tar -xOf "$ARCHIVE" index.json > "$T/index.json" || die "no index.json in $ARCHIVE"
[ "$(jq -r '.manifests | length' "$T/index.json")" = 1 ] || die "index.json should list one image index"
[ "$(jq -r '.manifests[0].annotations["io.containerd.image.name"]' "$T/index.json")" = "$IMAGE_NAME" ] \
    || die "io.containerd.image.name is not $IMAGE_NAME: $(cat "$T/index.json")"
[ "$(jq -r '.manifests[0].annotations["org.opencontainers.image.ref.name"]' "$T/index.json")" = "$TAG" ] \
    || die "org.opencontainers.image.ref.name is not $TAG"
[ "$(tar -xOf "$ARCHIVE" oci-layout)" = '{"imageLayoutVersion":"1.0.0"}' ] || die "bad oci-layout"
# containerd's importer takes regular files only.
if tar -tvf "$ARCHIVE" | grep -v '^[-d]'; then die "the archive holds entries that are neither files nor directories"; fi

echo "== deploy/base names this image"
names=$(grep -ho 'docker.io/strata/strata:[^ "]*' deploy/base/*.yaml | sort -u)
[ "$names" = "$IMAGE_NAME" ] || die "deploy/base names '$names', the image is $IMAGE_NAME"

echo "== skopeo inspect --raw oci-archive:...:$TAG"
skopeo inspect --raw "oci-archive:$ARCHIVE:$TAG" > "$T/platforms.json" || die "skopeo cannot read the archive"
plats=$(jq -r '.manifests[] | .platform.os + "/" + .platform.architecture + (if .platform.variant then "/" + .platform.variant else "" end)' "$T/platforms.json" | sort | tr '\n' ' ')
[ "$plats" = "linux/amd64 linux/arm64/v8 " ] || die "platforms are '$plats', not linux/amd64 linux/arm64/v8"
echo "   platforms: $plats"

for arch in amd64 arm64; do
    echo "== $arch: skopeo copy to an OCI layout, umoci unpack"
    skopeo copy -q --override-os linux --override-arch "$arch" "oci-archive:$ARCHIVE:$TAG" "oci:$T/layout:$arch" \
        || die "skopeo copy of $arch failed"
    cfg=$(skopeo inspect --config "oci:$T/layout:$arch") || die "skopeo inspect --config $arch failed"
    [ "$(jq -r .architecture <<<"$cfg")" = "$arch" ] || die "$arch config says $(jq -r .architecture <<<"$cfg")"
    [ "$(jq -r '.config.Entrypoint[0]' <<<"$cfg")" = /usr/bin/strata ] || die "$arch entrypoint is not /usr/bin/strata"
    umoci unpack --image "$T/layout:$arch" "$T/bundle-$arch" >/dev/null || die "umoci unpack of $arch failed"
    R=$T/bundle-$arch/rootfs
    # Exactly these executables, nothing else.
    got=$(cd "$R" && find . -type f -perm -u+x ! -name '*.so*' ! -name 'ld-linux*' -printf '%f\n' | sort | tr '\n' ' ')
    want="kmod mke2fs mkfs.xfs mount resize2fs strata umount xfs_growfs blkid "
    want=$(tr ' ' '\n' <<<"$want" | grep . | sort | tr '\n' ' ')
    [ "$got" = "$want" ] || die "$arch executables: '$got', want '$want'"
    for t in mkfs.ext4 mkfs.xfs resize2fs xfs_growfs blkid mount umount modprobe strata; do
        p=""; for d in sbin usr/sbin bin usr/bin; do { [ -e "$R/$d/$t" ] || [ -L "$R/$d/$t" ]; } && p=/$d/$t && break; done
        [ -n "$p" ] || die "$arch: $t is not on the image's PATH"
    done
    want_machine=X86-64; [ "$arch" = arm64 ] && want_machine=AArch64
    readelf -h "$R/usr/bin/strata" | grep -q "Machine:.*$want_machine" || die "$arch strata is not $want_machine"
    readelf -SW "$R/usr/bin/strata" | grep -qE ' \.(debug_info|symtab) ' && die "$arch strata is not stripped"
    [ -s "$R/etc/ssl/certs/ca-certificates.crt" ] || die "$arch: no CA bundle"
    echo "   $(du -sh --apparent-size "$R" | cut -f1) unpacked; strata $(stat -c %s "$R/usr/bin/strata") bytes"

    # Run the rootfs's own binaries: amd64 natively, arm64 under qemu-user.
    if [ "$arch" = arm64 ]; then
        cp /usr/bin/qemu-aarch64-static "$R/qemu-aarch64-static"
        run() { timeout 120 chroot "$R" /qemu-aarch64-static "$@"; }
    else
        run() { timeout 120 chroot "$R" "$@"; }
    fi
    # The output (stdout and stderr) of a tool's run holds PATTERN.
    has() { local pat=$1 o; shift; o=$(run "$@" 2>&1) || true; grep -q "$pat" <<<"$o" || { echo "$o" >&2; return 1; }; }
    v=$(run /usr/bin/strata --version) || die "$arch: strata --version failed"
    [ "$v" = "strata $VERSION" ] || die "$arch: strata --version says '$v'"
    run /usr/bin/strata csi --help >/dev/null || die "$arch: strata csi --help failed"
    has '^mke2fs 1\.47' /sbin/mkfs.ext4 -V || die "$arch: mkfs.ext4 -V"
    has 'util-linux' /sbin/blkid -V || die "$arch: blkid -V"
    has 'mkfs.xfs version 6' /sbin/mkfs.xfs -V || die "$arch: mkfs.xfs -V"
    has 'xfs_growfs version 6' /usr/sbin/xfs_growfs -V || die "$arch: xfs_growfs -V"
    has 'util-linux' /bin/mount -V || die "$arch: mount -V"
    has 'util-linux' /bin/umount -V || die "$arch: umount -V"
    has '^kmod version' /sbin/modprobe -V || die "$arch: modprobe -V"
    # A real filesystem on a file, made, probed and grown by the image's tools
    # (with /proc, as in a pod: the tools read /etc/mtab -> /proc/self/mounts).
    mount -t proc proc "$R/proc"
    truncate -s 64M "$R/tmp/ext4.img"
    run /sbin/mkfs.ext4 -q -F -m0 /tmp/ext4.img || die "$arch: mkfs.ext4 on a file failed"
    run /sbin/blkid -p -o export /tmp/ext4.img | grep -qx 'TYPE=ext4' || die "$arch: blkid does not see ext4"
    truncate -s 96M "$R/tmp/ext4.img"
    run /sbin/resize2fs -f /tmp/ext4.img >/dev/null 2>&1 || die "$arch: resize2fs failed"
    blocks=$(dumpe2fs -h "$R/tmp/ext4.img" 2>/dev/null | awk -F: '/^Block count/ {gsub(/ /,"",$2); print $2}')
    bsize=$(dumpe2fs -h "$R/tmp/ext4.img" 2>/dev/null | awk -F: '/^Block size/ {gsub(/ /,"",$2); print $2}')
    [ "$((blocks * bsize))" = $((96 << 20)) ] || die "$arch: resize2fs left $blocks blocks of $bsize"
    e2fsck -fn "$R/tmp/ext4.img" >/dev/null 2>&1 || die "$arch: the grown ext4 does not pass e2fsck"
    truncate -s 320M "$R/tmp/xfs.img"
    run /sbin/mkfs.xfs -q -K /tmp/xfs.img || die "$arch: mkfs.xfs on a file failed"
    run /sbin/blkid -p -o export /tmp/xfs.img | grep -qx 'TYPE=xfs' || die "$arch: blkid does not see xfs"
    rm -f "$R/tmp/ext4.img" "$R/tmp/xfs.img"
    umount "$R/proc"
    echo "   ran strata --version, strata csi --help, mkfs.ext4/xfs, blkid, resize2fs, xfs_growfs -V, mount/umount -V, modprobe -V"
done
echo "== containerd: ctr images import (as k3s does), in a throwaway root"
mkdir -p "$T/ctrd"
printf 'version = 2\nroot = "%s"\nstate = "%s"\n[grpc]\n  address = "%s"\n' \
    "$T/ctrd/root" "$T/ctrd/state" "$T/ctrd/sock" > "$T/containerd.toml"
containerd --config "$T/containerd.toml" >"$T/containerd.log" 2>&1 &
CTRD_PID=$!
ctr_() { timeout 120 ctr -a "$T/ctrd/sock" -n k8s.io "$@"; }
for _ in $(seq 1 50); do ctr_ version >/dev/null 2>&1 && break; sleep 0.2; done
ctr_ version >/dev/null 2>&1 || { tail -20 "$T/containerd.log"; die "containerd did not start"; }
# --no-unpack: every blob is checked against its digest on import; unpacking
# needs a snapshotter this sandbox may lack (umoci unpacked the layers above).
ctr_ images import --all-platforms --no-unpack "$ARCHIVE" >"$T/import.log" 2>&1 \
    || { cat "$T/import.log"; die "ctr images import refused the archive"; }
ctr_ images ls > "$T/images"
line=$(grep "^$IMAGE_NAME " "$T/images") || { cat "$T/import.log" "$T/images"; die "containerd does not list $IMAGE_NAME"; }
grep -q 'linux/amd64,linux/arm64/v8' <<<"$line" || { cat "$T/images"; die "containerd does not list both platforms"; }
ctr_ images check > "$T/check"
grep "^$IMAGE_NAME " "$T/check" | grep -q 'complete (' || { cat "$T/check"; die "containerd says the image is incomplete"; }
echo "   $line"
kill "$CTRD_PID"; wait "$CTRD_PID" 2>/dev/null || true; CTRD_PID=""

echo "== image checks passed in $(( $(date +%s) - t0 ))s"
