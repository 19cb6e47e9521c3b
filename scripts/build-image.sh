#!/usr/bin/env bash
# Builds strata's multi-arch OCI image (linux/amd64 + linux/arm64 in one
# index) as an OCI archive that `k3s ctr images import` and
# /var/lib/rancher/k3s/agent/images/ take, without a container engine or a
# registry and without any base image:
#   1. downloads Debian 12's packages of the node plugin's host tools for each
#      architecture (`apt-get download PKG:ARCH`, cached by file name under
#      ~/.cache/strata/debs) and extracts them with dpkg-deb;
#   2. stages a root filesystem per architecture holding the stripped
#      `strata` binary, exactly the tools below, the shared libraries they
#      and strata need (DT_NEEDED, followed recursively with readelf) and the
#      dynamic loader, mke2fs.conf and a CA bundle (S3 over HTTPS);
#   3. writes the archive with `strata-image` (image/): sorted entries, mtimes
#      at SOURCE_DATE_EPOCH (default: the last commit's time), owner 0:0,
#      gzip without timestamp or name.
# It does all of that twice, in two fresh directories, and fails unless the
# two archives are byte for byte the same (so the digests are too).
#
# Usage: bash scripts/build-image.sh
# Env: IMAGE_NAME (default docker.io/strata/strata:<workspace version>),
#      STRATA_BIN_AMD64 (default target/release/strata),
#      STRATA_BIN_ARM64 (default target/arm64/aarch64-unknown-linux-gnu/release/strata,
#        which scripts/arm64.sh builds), OUT (default target/image/strata-image.oci.tar),
#      STRATA_IMAGE_TOOL (a built strata-image; default: cargo build -p strata-image).
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022
ROOT=$PWD
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE_NAME=${IMAGE_NAME:-docker.io/strata/strata:$VERSION}
STRATA_BIN_AMD64=${STRATA_BIN_AMD64:-$ROOT/target/release/strata}
STRATA_BIN_ARM64=${STRATA_BIN_ARM64:-$ROOT/target/arm64/aarch64-unknown-linux-gnu/release/strata}
OUT=${OUT:-$ROOT/target/image/strata-image.oci.tar}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
DEB_CACHE=${STRATA_DEB_CACHE:-$HOME/.cache/strata/debs}
WORK=$ROOT/target/image/work
CARGO_LOCK=${CARGO_LOCK:-/tmp/strata-cargo.lock}

# The tools the CSI node plugin runs (csi/src/node/fs.rs: blkid, mkfs.ext4,
# mkfs.xfs, mount, umount, resize2fs, xfs_growfs; attach/src/kernel.rs:
# modprobe nbd, with the host's /lib/modules mounted). Not included: the
# attach fallbacks (iscsiadm needs the host's iscsid; nbdfuse + losetup),
# so in a pod the node plugin needs the kernel's nbd module.
TOOLS=(mkfs.ext4 mkfs.xfs resize2fs xfs_growfs blkid mount umount modprobe)
# Debian packages holding the tools and every library they and strata link.
PACKAGES=(e2fsprogs xfsprogs util-linux mount kmod
          libc6 libgcc-s1 libblkid1 libuuid1 libmount1 libselinux1 libpcre2-8-0 libext2fs2 libcom-err2
          libinih1 liburcu8 liblzma5 libzstd1 libssl3)
ARCHES=(amd64 arm64)

die() { echo "build-image: $*" >&2; exit 1; }
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

[ -x "$STRATA_BIN_AMD64" ] || die "no amd64 strata at $STRATA_BIN_AMD64 (cargo build --release --bin strata)"
[ -x "$STRATA_BIN_ARM64" ] || die "no arm64 strata at $STRATA_BIN_ARM64 (bash scripts/arm64.sh builds it)"
readelf -h "$STRATA_BIN_AMD64" | grep -q 'Machine:.*X86-64' || die "$STRATA_BIN_AMD64 is not an x86-64 binary"
readelf -h "$STRATA_BIN_ARM64" | grep -q 'Machine:.*AArch64' || die "$STRATA_BIN_ARM64 is not an AArch64 binary"

# apt-get download PKG:arm64 needs the architecture known to dpkg and apt.
need=()
command -v aarch64-linux-gnu-strip >/dev/null || need+=(binutils-aarch64-linux-gnu)
command -v readelf >/dev/null || need+=(binutils)
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $SUDO dpkg --add-architecture arm64
    $SUDO apt-get update -qq
elif ! apt-cache show libc6:arm64 >/dev/null 2>&1; then
    $SUDO apt-get update -qq
fi
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ -n "${STRATA_IMAGE_TOOL:-}" ]; then
    IMAGE_TOOL=$STRATA_IMAGE_TOOL
else
    echo "== strata-image (image/)"
    flock "$CARGO_LOCK" cargo build --release --quiet -p strata-image
    IMAGE_TOOL=$ROOT/target/release/strata-image
fi

# 1. Debian packages, per architecture: the candidate version of each, cached
# by file name (apt-get download as root warns that its sandbox user cannot
# write the cache: run it as root on purpose).
APT_DL=(apt-get download -qq); [ "$(id -u)" = 0 ] && APT_DL+=(-o APT::Sandbox::User=root)
fetch() { # PKG ARCH (amd64, arm64 or all) -> prints the cached file's path
    local pkg=$1 arch=$2 spec ver file
    spec=$pkg; [ "$arch" != all ] && spec=$pkg:$arch
    ver=$(apt-cache show --no-all-versions "$spec" 2>/dev/null | sed -n 's/^Version: //p' | head -1)
    [ -n "$ver" ] || die "apt has no $spec (apt-get update?)"
    file="$DEB_CACHE/$arch/${pkg}_${ver//:/%3a}_${arch}.deb"
    if [ ! -s "$file" ]; then
        mkdir -p "$DEB_CACHE/$arch"
        (cd "$DEB_CACHE/$arch" && "${APT_DL[@]}" "$spec=$ver" >/dev/null) || die "apt-get download $spec=$ver failed"
    fi
    [ -s "$file" ] || die "downloaded $spec=$ver but found no $file"
    echo "$file"
}
declare -A DEBS
CA_DEB=$(fetch ca-certificates all)
for arch in "${ARCHES[@]}"; do
    for pkg in "${PACKAGES[@]}"; do DEBS[$arch]+="$(fetch "$pkg" "$arch") "; done
    DEBS[$arch]+="$CA_DEB "
done

# Copies PATH (relative) from stage $1 to rootfs $2, following symlinks: the
# link and what it points to are both copied.
copy_in() {
    local stage=$1 rootfs=$2 rel=$3 n=0
    while :; do
        [ $((n += 1)) -lt 20 ] || die "symlink loop at $rel"
        [ -e "$stage/$rel" ] || [ -L "$stage/$rel" ] || die "$rel is not in the staged packages"
        mkdir -p "$rootfs/$(dirname "$rel")"
        [ -e "$rootfs/$rel" ] || [ -L "$rootfs/$rel" ] || cp -a "$stage/$rel" "$rootfs/$rel"
        [ -L "$stage/$rel" ] || return 0
        local t; t=$(readlink "$stage/$rel")
        case $t in /*) rel=${t#/} ;; *) rel=$(realpath -m --relative-to="$stage" "$stage/$(dirname "$rel")/$t") ;; esac
    done
}

# The library directories of each architecture, in the loader's order.
libdirs() {
    case $1 in
        amd64) echo "lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib64 lib usr/lib" ;;
        arm64) echo "lib/aarch64-linux-gnu usr/lib/aarch64-linux-gnu lib usr/lib" ;;
    esac
}

# 2. One root filesystem per architecture.
stage_rootfs() {
    local arch=$1 dir=$2 bin=$3
    local stage=$dir/stage-$arch rootfs=$dir/rootfs-$arch
    mkdir -p "$stage" "$rootfs"
    for f in ${DEBS[$arch]}; do dpkg-deb -x "$f" "$stage"; done
    mkdir -p "$rootfs/usr/bin"
    case $arch in
        amd64) strip -o "$rootfs/usr/bin/strata" "$bin" ;;
        arm64) aarch64-linux-gnu-strip -o "$rootfs/usr/bin/strata" "$bin" ;;
    esac
    for tool in "${TOOLS[@]}"; do
        local found=""
        for d in sbin usr/sbin bin usr/bin; do
            if [ -e "$stage/$d/$tool" ] || [ -L "$stage/$d/$tool" ]; then found=$d/$tool; break; fi
        done
        [ -n "$found" ] || die "$tool is in none of the $arch packages"
        copy_in "$stage" "$rootfs" "$found"
    done
    # Shared libraries: DT_NEEDED of every ELF file, until nothing is added.
    local changed=1
    while [ $changed = 1 ]; do
        changed=0
        while IFS= read -r -d '' elf; do
            head -c4 "$elf" | grep -q 'ELF' || continue
            local interp
            interp=$(readelf -lW "$elf" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
            if [ -n "$interp" ] && [ ! -e "$rootfs$interp" ]; then
                copy_in "$stage" "$rootfs" "${interp#/}"; changed=1
            fi
            for lib in $(readelf -dW "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
                local have=""
                for d in $(libdirs "$arch"); do
                    if [ -e "$rootfs/$d/$lib" ]; then have=1; break; fi
                done
                [ -n "$have" ] && continue
                for d in $(libdirs "$arch"); do
                    if [ -e "$stage/$d/$lib" ]; then copy_in "$stage" "$rootfs" "$d/$lib"; have=1; changed=1; break; fi
                done
                [ -n "$have" ] || die "$arch: $lib (needed by ${elf#"$rootfs"/}) is in none of the packages: add its package to PACKAGES"
            done
        done < <(find "$rootfs" -type f -print0 | sort -z)
    done
    # Configuration the tools and strata read.
    copy_in "$stage" "$rootfs" etc/mke2fs.conf
    mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" "$rootfs/run"
    chmod 1777 "$rootfs/tmp"
    find "$stage/usr/share/ca-certificates/mozilla" -name '*.crt' -print0 | sort -z | xargs -0 cat \
        > "$rootfs/etc/ssl/certs/ca-certificates.crt"
    ln -s ../proc/self/mounts "$rootfs/etc/mtab"
    printf 'root:x:0:0:root:/root:/usr/bin/strata\n' > "$rootfs/etc/passwd"
    printf 'root:x:0:\n' > "$rootfs/etc/group"
    # Which Debian package versions went in (the image is only as
    # reproducible as the archive it was built from).
    mkdir -p "$rootfs/usr/share/strata"
    for f in ${DEBS[$arch]}; do basename "$f" .deb; done | sort > "$rootfs/usr/share/strata/debian-packages"
}

build_once() {
    local dir=$1 out=$2
    rm -rf "$dir"; mkdir -p "$dir"
    stage_rootfs amd64 "$dir" "$STRATA_BIN_AMD64"
    stage_rootfs arm64 "$dir" "$STRATA_BIN_ARM64"
    "$IMAGE_TOOL" --name "$IMAGE_NAME" --epoch "$SOURCE_DATE_EPOCH" --out "$out" \
        --rootfs "amd64=$dir/rootfs-amd64" --rootfs "arm64=$dir/rootfs-arm64" > "$dir/digests" 2> "$dir/sizes" \
        || { cat "$dir/sizes" >&2; die "strata-image failed"; }
}

mkdir -p "$(dirname "$OUT")"
start=$(date +%s)
echo "== building $IMAGE_NAME twice (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
build_once "$WORK/a" "$OUT"
build_once "$WORK/b" "$WORK/second.oci.tar"
one=$(sha256sum < "$OUT" | cut -d' ' -f1)
two=$(sha256sum < "$WORK/second.oci.tar" | cut -d' ' -f1)
if [ "$one" != "$two" ] || ! cmp -s "$WORK/a/digests" "$WORK/b/digests"; then
    diff "$WORK/a/digests" "$WORK/b/digests" || true
    die "two builds differ: $one vs $two (not reproducible)"
fi
cat "$WORK/a/sizes"
cat "$WORK/a/digests"
echo "reproducible: both builds give archive sha256:$one"
for arch in "${ARCHES[@]}"; do
    gz=$(awk -v a="$arch" '$1=="manifest" && $2==a {print $4}' "$WORK/a/digests")
    printf '%s: compressed layer %d bytes (%s MiB), rootfs %s\n' "$arch" "$gz" "$(awk -v b="$gz" 'BEGIN{printf "%.1f", b/1048576}')" \
        "$(du -sh --apparent-size "$WORK/a/rootfs-$arch" | cut -f1)"
done
printf 'archive %s: %d bytes, built twice in %ds\n' "$OUT" "$(stat -c %s "$OUT")" "$(( $(date +%s) - start ))"
cp "$WORK/a/digests" "$OUT.digests"
# The second build and the staged trees are only needed for the comparison.
rm -rf "$WORK"
