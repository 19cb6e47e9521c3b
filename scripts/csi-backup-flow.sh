#!/usr/bin/env bash
# Backups as VolumeSnapshots and disaster recovery into a new cluster, through a real
# Kubernetes control plane, the real external-provisioner and snapshot-controller, strata
# csi's built-in snapshotter, and a real S3 server (moto on loopback, scripts/s3-servers.sh).
#
#   bash scripts/csi-backup-flow.sh      (moto is installed into .ci-venv if missing)
#
# Cluster A: a PVC of a StorageClass with backupSecret gets data (qemu-io over NBD to its
# Service address: patterns and 32 MiB of random bytes); a VolumeSnapshot of a `type: backup`
# class (deploy/base/snapshotclass-backup.yaml with this test's bucket) becomes readyToUse,
# one backup ran however often the snapshotter called CreateSnapshot, and its handle names a
# manifest in S3; data written after it must not come back. Bad input: a class with a
# file:// target, a backup of a volume whose class has no backupSecret, and a restore into a
# StorageClass without backupSecret each fail with a clear error and create nothing.
# Then the whole of cluster A goes (control plane, CSI controller, volume controllers,
# replica servers and their data). Cluster B, new and empty, gets the handle only: a
# pre-provisioned VolumeSnapshotContent, a VolumeSnapshot bound to it and a PVC from it; the
# PVC binds once the backup is restored, and holds the data. Deleting the VolumeSnapshot
# (deletionPolicy Delete) removes the backup's manifest from S3. Timings are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. tests/k8s/env.sh
k8s_env_netns "$0" "$@"
# shellcheck disable=SC1091
. scripts/s3-servers.sh
dir="$(mktemp -d /tmp/strata-csi-backup.XXXXXX)"
echo "== work directory: $dir"
trap 'k8s_env_down "$dir"; s3_stop "$dir"' EXIT
s3_start_moto "$dir"
s3="$STRATA_S3_MOTO_ENDPOINT"
bucket=strata prefix="dr-$$"
target="s3://$bucket/$prefix"
backup_key="$(head -c 32 /dev/urandom | base64)"
ns="$K8S_ENV_NS"
k="kubectl -n default"

fail() { echo "FAIL: $*" >&2; kubectl -n default get pvc,volumesnapshot,volumesnapshotcontent -o wide >&2 || true; exit 1; }
t_start=$(date +%s.%N)
lap() { awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f s", b-a}'; }
timed() { t_start=$(date +%s.%N); }
manifests() { # keys under the test's prefix in S3 (moto answers ListObjectsV2)
    curl -s "$s3/$bucket?list-type=2&prefix=$prefix/manifests/" |
        grep -o '<Key>[^<]*</Key>' | sed -e 's/<Key>//' -e 's/<\/Key>//' || true
}

# cluster DIR: a control plane with strata's CSI controller and the provisioner, the snapshot CRDs,
# the backup Secret, StorageClasses `strata` (no secret) and `strata-backup`, and the
# VolumeSnapshotClasses of deploy/base (the backup one pointed at moto's bucket).
cluster() {
    local d="$1"
    mkdir -p "$d"
    k8s_env_up "$d"
    k8s_env_snapshot_crds
    kubectl apply -f deploy/base/rbac-sidecars.yaml -f deploy/base/csidriver.yaml \
        -f deploy/base/snapshotclass.yaml >/dev/null
    sed -e "s|s3://my-bucket/strata|$target|" deploy/base/snapshotclass-backup.yaml | kubectl apply -f - >/dev/null
    kubectl -n "$ns" create secret generic strata-backup \
        --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
        --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
        --from-literal=AWS_REGION=us-east-1 --from-literal=STRATA_S3_ENDPOINT="$s3" \
        --from-literal=STRATA_BACKUP_KEY="$backup_key" >/dev/null
    # Immediate: no scheduler here picks a node.
    sed -e 's/WaitForFirstConsumer/Immediate/' deploy/base/storageclass.yaml | kubectl apply -f - >/dev/null
    kubectl apply -f - >/dev/null <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: strata-backup}
provisioner: csi.strata.io
parameters: {replicas: "3", backupSecret: strata-backup}
reclaimPolicy: Delete
volumeBindingMode: Immediate
YAML
    k8s_env_csi_controller "$d" snapshot-controller
}

pvc() { # name size storageclass [VolumeSnapshot name]
    local src=""
    [ -n "${4:-}" ] && src="  dataSource: {kind: VolumeSnapshot, name: $4, apiGroup: snapshot.storage.k8s.io}"
    $k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  storageClassName: $3
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: $2}}
$src
YAML
}
vsnap() { # name class pvc
    $k apply -f - >/dev/null <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: $1}
spec:
  volumeSnapshotClassName: $2
  source: {persistentVolumeClaimName: $3}
YAML
}
bound() { $k wait --for jsonpath='{.status.phase}'=Bound --timeout "${2:-120}s" "pvc/$1" >/dev/null || fail "pvc/$1 not bound"; }
volume_of() { $k get pvc "$1" -o jsonpath='{.spec.volumeName}'; }
nbd_of() { kubectl get pv "$(volume_of "$1")" -o jsonpath='{.spec.csi.volumeAttributes.strata\.io/nbd-uri}'; }
serving() {
    local i
    for i in $(seq 120); do qemu-img info "$1" >/dev/null 2>&1 && return 0; sleep 0.25; done
    fail "nothing serves $1"
}
events() { $k get events --field-selector "involvedObject.name=$1" -o jsonpath='{.items[*].message}'; }

echo "== cluster A"
timed; cluster "$dir/a"; echo "   up in $(lap)"

echo "== a volume with data"
timed; pvc data-1 64Mi strata-backup; bound data-1; echo "   data-1 bound in $(lap)"
vol="$(volume_of data-1)"
kubectl -n "$ns" wait --for jsonpath='{.status.phase}'=Ready --timeout 60s "stratavolume/$vol" >/dev/null ||
    fail "StrataVolume $vol never Ready"
uri="$(nbd_of data-1)"
serving "$uri"
head -c 32M /dev/urandom >"$dir/random"   # incompressible: the backup takes a moment
qemu-io -f raw -c "write -P 0x5a 0 1M" -c "write -s $dir/random 8M 32M" -c "write -P 0xa5 63M 1M" \
    -c flush "$uri" >/dev/null || fail "cannot write to $uri"

echo "== backup VolumeSnapshot"
timed; vsnap backup-1 strata-backup data-1
seen_false=no
for _ in $(seq 360); do
    case "$($k get volumesnapshot backup-1 -o jsonpath='{.status.readyToUse}')" in
    true) break ;;
    false) seen_false=yes ;;
    esac
    sleep 0.5
done
[ "$($k get volumesnapshot backup-1 -o jsonpath='{.status.readyToUse}')" = true ] ||
    fail "backup-1 not ready: $($k get volumesnapshot backup-1 -o jsonpath='{.status}')"
echo "   backup-1 ready in $(lap) (readyToUse false seen while it ran: $seen_false)"
content="$($k get volumesnapshot backup-1 -o jsonpath='{.status.boundVolumeSnapshotContentName}')"
# However often the snapshotter asked (it asks again while readyToUse is false), one backup ran.
calls="$(grep "snapshot not ready yet" "$dir/a/csi-controller.log" | grep -c "$content" || true)"
calls=$((calls + 1))
runs="$(grep -c 'backup ended' "$dir/a/csi-controller.log" || true)"
echo "   CreateSnapshot calls for it: $calls; backups run: $runs"
[ "$runs" = 1 ] || fail "$runs backups ran for one VolumeSnapshot"
handle="$(kubectl get volumesnapshotcontent "$content" -o jsonpath='{.status.snapshotHandle}')"
echo "   handle: $handle"
case "$handle" in "backup:$((64 << 20)):$vol/"*"@$target") ;; *) fail "unexpected handle $handle" ;; esac
bid="${handle#*:*:}"; bid="${bid%@*}"
manifests | grep -qx "$prefix/manifests/$bid" || fail "no manifest $bid in S3: $(manifests)"
[ "$(kubectl -n "$ns" get stratavolume "$vol" -o jsonpath='{.spec.backups[0].state}')" = Ready ] ||
    fail "the StrataVolume does not record the backup as Ready"
kubectl get volumesnapshotcontent "$content" \
    -o jsonpath='{.metadata.annotations.snapshot\.storage\.kubernetes\.io/deletion-secret-name}' |
    grep -qx strata-backup || fail "the content has no deletion secret annotation"
# Written after the backup: must not come back.
qemu-io -f raw -c "write -P 0x33 0 1M" -c flush "$uri" >/dev/null

echo "== bad input"
kubectl apply -f - >/dev/null <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: strata-bad-target}
driver: csi.strata.io
deletionPolicy: Delete
parameters: {type: backup, target: "file:///tmp/backups"}
YAML
vsnap bad-target strata-bad-target data-1
pvc plain-1 64Mi strata; bound plain-1
vsnap bad-nosecret strata-backup plain-1
pvc bad-restore 64Mi strata backup-1
snap_error() { $k get volumesnapshot "$1" -o jsonpath='{.status.error.message}'; }
within() { # seconds command...: until the command succeeds
    local i n=$(($1 * 2)); shift
    for i in $(seq "$n"); do "$@" && return 0; sleep 0.5; done
    return 1
}
within 60 eval 'snap_error bad-target | grep -q "only s3://"' ||
    fail "no clear error for a file:// target: $($k get volumesnapshot bad-target -o jsonpath='{.status}')"
within 60 eval 'snap_error bad-nosecret | grep -q "no backupSecret"' ||
    fail "no clear error for a backup without a secret: $($k get volumesnapshot bad-nosecret -o jsonpath='{.status}')"
within 60 eval 'events bad-restore | grep -q "needs S3 credentials: give the StorageClass a backupSecret"' ||
    fail "no clear event for a restore without backupSecret: $(events bad-restore)"
[ "$($k get pvc bad-restore -o jsonpath='{.status.phase}')" = Pending ] || fail "bad-restore is not Pending"
[ "$($k get volumesnapshot bad-target -o jsonpath='{.status.readyToUse}')" != true ] || fail "bad-target is ready"
[ "$(kubectl -n "$ns" get stratavolumes --no-headers | wc -l)" = 2 ] || fail "bad input left a StrataVolume"
[ "$(manifests | wc -l)" = 1 ] || fail "bad input left a backup: $(manifests)"
echo "   refused with clear errors, nothing created"

echo "== cluster A is lost (control plane, controllers, replica servers and their data)"
timed
k8s_env_down "$dir/a"
set -euo pipefail # k8s_env_down turns them off (it is made for an EXIT trap)
K8S_ENV_PIDS=()
k8s_stop "$dir/a/k8s"
rm -rf "$dir"/a/replica-*
echo "   gone in $(lap)"

echo "== cluster B, new: restore from the handle alone"
timed; cluster "$dir/b"; echo "   up in $(lap)"
[ "$(kubectl -n "$ns" get stratavolumes --no-headers 2>/dev/null | wc -l)" = 0 ] || fail "cluster B is not empty"
timed
kubectl apply -f - >/dev/null <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotContent
metadata:
  name: dr-content
  annotations:
    snapshot.storage.kubernetes.io/deletion-secret-name: strata-backup
    snapshot.storage.kubernetes.io/deletion-secret-namespace: $ns
spec:
  deletionPolicy: Delete
  driver: csi.strata.io
  volumeSnapshotClassName: strata-backup
  source: {snapshotHandle: "$handle"}
  volumeSnapshotRef: {name: dr-snap, namespace: default}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: dr-snap, namespace: default}
spec:
  volumeSnapshotClassName: strata-backup
  source: {volumeSnapshotContentName: dr-content}
YAML
$k wait --for jsonpath='{.status.readyToUse}'=true --timeout 120s volumesnapshot/dr-snap >/dev/null ||
    fail "dr-snap not ready: $($k get volumesnapshot dr-snap -o jsonpath='{.status}')"
echo "   pre-provisioned dr-snap ready in $(lap)"
timed; pvc dr-1 64Mi strata-backup dr-snap; bound dr-1 180
echo "   dr-1 restored and bound in $(lap)"
dvol="$(volume_of dr-1)"
[ "$(kubectl -n "$ns" get stratavolume "$dvol" -o jsonpath='{.spec.source.snapshot}')" = "$handle" ] ||
    fail "the restored volume does not name its source"
serving "$(nbd_of dr-1)"
qemu-io -f raw -c "read -P 0x5a 0 1M" -c "read -P 0xa5 63M 1M" "$(nbd_of dr-1)" | grep -q "read 1048576" ||
    fail "dr-1 does not hold the backup's data"
qemu-io -f raw -c "read -P 0x5a 0 1M" -c "read -P 0xa5 63M 1M" "$(nbd_of dr-1)" 2>&1 |
    grep -q "Pattern verification failed" && fail "dr-1 content differs from the backup"
qemu-img convert -f raw -O raw "$(nbd_of dr-1)" "$dir/restored.raw"
cmp <(dd if="$dir/restored.raw" bs=1M skip=8 count=32 2>/dev/null) "$dir/random" ||
    fail "dr-1's 32 MiB of random data differ from what was backed up"
rm -f "$dir/restored.raw" "$dir/random"
echo "   dr-1 holds the data backed up in cluster A (and not what was written after)"

echo "== deleting the VolumeSnapshot removes the backup from S3"
timed
$k delete volumesnapshot dr-snap --timeout 120s >/dev/null || fail "dr-snap not deleted"
for _ in $(seq 60); do kubectl get volumesnapshotcontent dr-content >/dev/null 2>&1 || break; sleep 0.5; done
kubectl get volumesnapshotcontent dr-content >/dev/null 2>&1 && fail "dr-content is still there"
[ -z "$(manifests)" ] || fail "the backup's manifest is still in S3: $(manifests)"
echo "   backup removed in $(lap)"
$k delete pvc dr-1 --timeout 120s >/dev/null
for _ in $(seq 120); do
    [ "$(k8s_env_leftovers "$dir/b")" = "$K8S_ENV_CLEAN" ] && break
    sleep 0.5
done
left="$(k8s_env_leftovers "$dir/b")"
[ "$left" = "$K8S_ENV_CLEAN" ] || fail "left behind: $left"
echo "== backup flow passed"
