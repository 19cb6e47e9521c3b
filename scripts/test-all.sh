#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine with only Rust on it:
# installs the real clients the tests use, then runs formatting, lints,
# every test (unit, property, crash, real-client end to end) and a smoke run
# of the end-to-end benchmark. Usage: bash scripts/test-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-off build gains nothing from incremental state; it only costs disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

need_apt=()
for tool in fio:fio nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdfuse:libnbd-bin nbdkit:nbdkit \
            nbd-server:nbd-server fusermount3:fuse3 qemu-io:qemu-utils qemu-img:qemu-utils qemu-nbd:qemu-utils; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool#*:}")
done
for tool in iscsi-test-cu:libiscsi-bin tgtd:tgt curl:curl kubectl:kubectl openssl:openssl mkfs.xfs:xfsprogs \
            pkg-config:pkg-config; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool#*:}")
done
# NBD TLS links OpenSSL statically from Debian's libssl-dev (scripts/openssl-env.sh).
dpkg -s libssl-dev >/dev/null 2>&1 || need_apt+=(libssl-dev)
. scripts/openssl-env.sh
# moto (the S3 server of the backup tests) goes into a Python venv.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
# PyYAML: the Kubernetes scripts read rendered manifests.
python3 -c 'import yaml' >/dev/null 2>&1 || need_apt+=(python3-yaml)
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== installing: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# qemu over iscsi:// needs qemu-block-extra, which Debian 12 has only for its
# qemu 7.2: pin qemu-utils to the same build (installing both unpinned fails).
if ! dpkg -s qemu-block-extra >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    V=$(apt-cache madison qemu-utils | awk -F'|' '/bookworm\/main/{gsub(/ /,"",$2); print $2; exit}')
    echo "== installing: qemu-utils=$V qemu-block-extra=$V"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --allow-downgrades --no-install-recommends \
        "qemu-utils=$V" "qemu-block-extra=$V" >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo build (release binary for the end-to-end tests)"
cargo build --release --quiet --bin strata
echo "== S3 servers for the backup tests (moto -> .ci-venv, s3s-fs -> .ci-tools)"
. scripts/s3-servers.sh
s3_install
echo "   the strata binary needs no libssl/libcrypto shared library:"
if readelf -dW target/release/strata | grep -E 'NEEDED.*lib(ssl|crypto)'; then
    echo "target/release/strata links OpenSSL dynamically (OPENSSL_STATIC not honoured)" >&2
    exit 1
fi
echo "== cargo test (tests/nbd_tls.rs: NBD over TLS with nbdinfo and qemu-io; tests/wire_encryption.rs: encrypted replica wire through a recording relay)"
STRATA_BIN="$PWD/target/release/strata" cargo test --workspace --quiet 2>&1 | tee target/test-output.txt
echo "== the process tests again with a cluster key: every strata process they start holds it"
echo "   (replica servers, controllers, the CLI; iSCSI with CHAP from the key)"
key_dir="$(mktemp -d)"
target/release/strata key init --out "$key_dir/cluster.key" >/dev/null
STRATA_CLUSTER_KEY_FILE="$key_dir/cluster.key" STRATA_BIN="$PWD/target/release/strata" \
    cargo test --quiet --test nbd_volume --test snapshots --test recovery --test expand \
    --test lagging --test error_mapping 2>&1 | tee target/test-keyed-output.txt
rm -rf "$key_dir"
echo "== arm64: cross-build with Debian's rustc-web, unit and store tests and strata up under qemu-user (scripts/arm64.sh)"
s0=$SECONDS
bash scripts/arm64.sh 2>&1 | tee target/arm64-output.txt
echo "   arm64 step: $((SECONDS - s0))s"
echo "== the multi-arch OCI image, built twice and compared (scripts/build-image.sh)"
s0=$SECONDS
bash scripts/build-image.sh 2>&1 | tee target/build-image-output.txt
echo "   image build: $((SECONDS - s0))s"
echo "== the image checked with skopeo, umoci, chroot and qemu-user (scripts/image-test.sh)"
s0=$SECONDS
bash scripts/image-test.sh 2>&1 | tee target/image-test-output.txt
echo "   image checks: $((SECONDS - s0))s"
echo "== dashboard and alert rules (scripts/observability-check.sh)"
bash scripts/observability-check.sh
echo "== Kubernetes test tools: etcd, kube-apiserver, kube-controller-manager, external-provisioner, snapshot-controller, csi-sanity"
echo "   (built once from their Go modules into ~/.cache/strata-tools, keyed by version; scripts/k8s-tools.sh)"
bash scripts/k8s-tools.sh >target/k8s-tools-output.txt 2>&1 || { tail -30 target/k8s-tools-output.txt; exit 1; }
# shellcheck disable=SC1091
. "${STRATA_TOOLS_CACHE:-$HOME/.cache/strata-tools}/env.sh"
echo "== csi-sanity against strata csi (mount and block; scripts/csi-sanity.sh)"
STRATA_BIN="$PWD/target/release/strata" bash scripts/csi-sanity.sh all 2>&1 | tee target/csi-sanity-output.txt
echo "== a PVC's life through a real control plane with the provisioner and snapshot-controller (scripts/csi-k8s-flow.sh)"
STRATA_BIN="$PWD/target/release/strata" bash scripts/csi-k8s-flow.sh 2>&1 | tee target/csi-flow-output.txt
echo "== backups as VolumeSnapshots and a restore in a new cluster (scripts/csi-backup-flow.sh)"
STRATA_BIN="$PWD/target/release/strata" bash scripts/csi-backup-flow.sh 2>&1 | tee target/csi-backup-flow-output.txt
echo "== a node dies under a volume's controller pod (scripts/csi-failover.sh)"
STRATA_BIN="$PWD/target/release/strata" bash scripts/csi-failover.sh 2>&1 | tee target/csi-failover-output.txt
echo "== the replica DaemonSet and a volume's controller upgraded under a writing client (scripts/csi-rolling-update.sh)"
STRATA_BIN="$PWD/target/release/strata" bash scripts/csi-rolling-update.sh 2>&1 | tee target/csi-rolling-update-output.txt
echo "== strata's footprint on an idle cluster with 5 volumes (scripts/footprint.sh)"
STRATA_BIN="$PWD/target/release/strata" bash scripts/footprint.sh 2>&1 | tee target/footprint-output.txt
echo "== kernel attach test in a VM (Debian kernel under QEMU TCG; scripts/vm-attach-test.sh)"
STRATA_BIN="$PWD/target/release/strata" bash scripts/vm-attach-test.sh 2>&1 | tee target/vm-attach-output.txt
if [ -x scripts/bench-e2e.sh ]; then
    echo "== end-to-end benchmark smoke run"
    bash scripts/bench-e2e.sh --smoke
fi
echo "== all checks passed"
