#!/usr/bin/env bash
# A PVC's life through a real Kubernetes control plane: the real external-provisioner
# sidecar and snapshot-controller (with the VolumeSnapshot CRDs), and `strata csi --mode
# controller` doing the resizer's and snapshotter's work itself, with three replica servers.
#
#   bash scripts/csi-k8s-flow.sh
#
# Checked, in order: deploy/base and deploy/examples pass a server-side dry run; a PVC is
# provisioned and bound; a StorageClass with backup schedules gives a volume controller that
# runs them with the backup Secret; its StrataVolume, Deployment and Service
# appear and the StrataVolume's status turns Ready; data written to the volume (qemu-io over
# NBD to its Service address) is in a VolumeSnapshot restored into a new PVC and in a clone
# PVC; a PVC resize completes (volumeMode Block: the node step is not needed, so the resize
# finishes without a kubelet), and a filesystem PVC's resize stops at the kubelet's step
# (FileSystemResizePending) with the PV grown; a resize strata refuses is recorded on the
# PVC (ControllerResizeInfeasible, an event) and a later valid one still completes;
# StorageClass mistakes (an unknown parameter, more replicas than nodes) leave the PVC
# Pending with the reason in its events and nothing created;
# deleting everything leaves no StrataVolume, Deployment, Service, PV or replica data; the
# provisioner, run with deploy/'s flags, answers the liveness probe's path.
#
# Nothing here runs a kubelet: the volume controller pods are run by tests/k8s/pod-runner.py
# (the exact command of the Deployment strata created; see its header); the provisioner and
# strata run with the strata-csi-controller ServiceAccount's token and deploy/base's RBAC
# (the snapshot-controller, a cluster component, runs as admin). Timings are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. tests/k8s/env.sh
k8s_env_netns "$0" "$@"
dir="$(mktemp -d /tmp/strata-csi-flow.XXXXXX)"
echo "== work directory: $dir"
trap 'k8s_env_down "$dir"' EXIT
k8s_env_up "$dir"
ns="$K8S_ENV_NS"

echo "== deploy/ against the API server (kubectl apply --dry-run=server -k deploy/)"
kubectl apply --dry-run=server -k deploy/ >"$dir/deploy-dry-run.txt" ||
    { cat "$dir/deploy-dry-run.txt" >&2; echo "FAIL: deploy/ does not validate" >&2; exit 1; }
echo "   $(grep -c . "$dir/deploy-dry-run.txt") objects accepted"
for o in deploy/overlays/*/; do
    kubectl apply --dry-run=server -k "$o" >/dev/null 2>"$dir/overlay-dry-run.err" ||
        { cat "$dir/overlay-dry-run.err" >&2; echo "FAIL: $o does not validate" >&2; exit 1; }
done
# The overlays patch by list index: they must still hit every path they mean to move.
kubectl kustomize deploy/overlays/kubelet-path >"$dir/kubelet-path.yaml"
kubectl kustomize deploy/overlays/data-path >"$dir/data-path.yaml"
if grep -Eq '(^|[ :="])/var/lib/kubelet' "$dir/kubelet-path.yaml"; then
    echo "FAIL: deploy/overlays/kubelet-path leaves a /var/lib/kubelet path" >&2; exit 1
fi
grep -A1 "hostPath:" "$dir/data-path.yaml" >"$dir/data-path-hostpaths.txt" || true
grep -q "path: /mnt/big-disk/strata" "$dir/data-path-hostpaths.txt" ||
    { echo "FAIL: deploy/overlays/data-path does not move the replica data" >&2; exit 1; }
echo "   deploy/overlays/*: accepted, and they move the paths they say"

k8s_env_snapshot_crds
kubectl apply -f deploy/base/rbac-sidecars.yaml -f deploy/base/csidriver.yaml \
    -f deploy/base/snapshotclass.yaml >/dev/null
echo "== deploy/examples/ against the API server (kubectl apply --dry-run=server)"
kubectl apply --dry-run=server -f deploy/examples/ >"$dir/examples-dry-run.txt" ||
    { cat "$dir/examples-dry-run.txt" >&2; echo "FAIL: deploy/examples/ does not validate" >&2; exit 1; }
echo "   $(grep -c . "$dir/examples-dry-run.txt") objects accepted"
# The test's StorageClass: deploy/'s, but Immediate (no scheduler here picks a node).
sed -e 's/WaitForFirstConsumer/Immediate/' deploy/base/storageclass.yaml | kubectl apply -f - >/dev/null

k8s_env_csi_controller "$dir" snapshot-controller

k="kubectl -n default"
fail() { echo "FAIL: $*" >&2; kubectl -n default get pvc,volumesnapshot -o wide >&2 || true; exit 1; }
t_start=$(date +%s.%N)
lap() { awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f s", b-a}'; }
timed() { t_start=$(date +%s.%N); }
pvc() { # name size [dataSource-kind dataSource-name [apiGroup]]
    local src=""
    if [ -n "${3:-}" ]; then
        src="  dataSource: {kind: $3, name: $4${5:+, apiGroup: $5}}"
    fi
    $k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  storageClassName: ${SC:-strata}
  volumeMode: ${MODE:-Block}
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: $2}}
$src
YAML
}
bound() { $k wait --for jsonpath='{.status.phase}'=Bound --timeout 120s "pvc/$1" >/dev/null || fail "pvc/$1 not bound"; }
volume_of() { $k get pvc "$1" -o jsonpath='{.spec.volumeName}'; }
nbd_of() { # the NBD URI strata handed to the node plugin
    kubectl get pv "$(volume_of "$1")" -o jsonpath='{.spec.csi.volumeAttributes.strata\.io/nbd-uri}'
}

# A volume's controller pod starts after its PVC is bound: wait until it serves.
serving() {
    local i
    for i in $(seq 120); do qemu-img info "$1" >/dev/null 2>&1 && return 0; sleep 0.25; done
    fail "nothing serves $1"
}

echo "== provision"
timed; pvc data-1 64Mi; bound data-1; echo "   data-1 bound in $(lap)"
vol="$(volume_of data-1)"
kubectl -n "$ns" get stratavolume "$vol" >/dev/null || fail "no StrataVolume $vol"
kubectl -n "$ns" get deployment "strata-$vol" >/dev/null || fail "no Deployment strata-$vol"
kubectl -n "$ns" get service "strata-$vol" >/dev/null || fail "no Service strata-$vol"
kubectl -n "$ns" wait --for jsonpath='{.status.phase}'=Ready --timeout 60s "stratavolume/$vol" >/dev/null ||
    fail "StrataVolume $vol never Ready: $(kubectl -n "$ns" get stratavolume "$vol" -o jsonpath='{.status}')"
kubectl -n "$ns" get stratavolumes
uri="$(nbd_of data-1)"
serving "$uri"
qemu-io -f raw -c "write -P 0x5a 0 1M" -c "write -P 0xa5 63M 1M" -c flush "$uri" >/dev/null ||
    fail "cannot write to $uri"

echo "== deploy/base/networkpolicy.yaml selects this volume's pod and admits only the node plugin to NBD"
# No network policy engine runs here (no CNI): this checks the policy's selectors and ports
# against the real objects' labels, which is what decides whom k3s' policy controller admits.
kubectl kustomize deploy/ >"$dir/deploy-rendered.yaml"
kubectl -n "$ns" get deployment "strata-$vol" -o json >"$dir/volume-deployment.json"
python3 - "$dir/deploy-rendered.yaml" "$dir/volume-deployment.json" deploy/examples/mariadb.yaml <<'PY' ||
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
vol = json.load(open(sys.argv[2]))
apps = [d for d in yaml.safe_load_all(open(sys.argv[3])) if d and d.get("kind") == "StatefulSet"]
pol = next(d for d in docs if d["kind"] == "NetworkPolicy")
node_ds = next(d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "strata-csi-node")
csi_ctl = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "strata-csi-controller")
def matches(sel, labels):
    return all(labels.get(k) == v for k, v in sel.get("matchLabels", {}).items()) and not sel.get("matchExpressions")
def labels(obj):
    return obj["spec"]["template"]["metadata"]["labels"]
spec = pol["spec"]
assert pol["metadata"]["namespace"] == vol["metadata"]["namespace"], "policy in another namespace"
assert matches(spec["podSelector"], labels(vol)), "the policy does not select the volume's pod"
assert spec["policyTypes"] == ["Ingress"]
def admitted(port, src_labels, same_ns=True):
    for rule in spec["ingress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        froms = rule.get("from")
        if froms is None:
            return True
        if any("podSelector" in f and "namespaceSelector" not in f and same_ns
               and matches(f["podSelector"], src_labels) for f in froms):
            return True
    return False
ports = {p["name"]: p["containerPort"] for p in vol["spec"]["template"]["spec"]["containers"][0]["ports"]}
nbd = ports["nbd"]
assert admitted(nbd, labels(node_ds)), "the node plugin cannot reach NBD"
assert not admitted(nbd, labels(csi_ctl)), "the CSI controller pod reaches NBD"
for app in apps:
    assert not admitted(nbd, labels(app), same_ns=False), "an application pod reaches NBD"
    assert not admitted(nbd, labels(app)), "an application pod in strata-system reaches NBD"
assert not admitted(nbd, {}), "an unlabelled pod reaches NBD"
assert admitted(ports["control"], {}) and admitted(ports["metrics"], {}), "management or metrics closed"
print(f"   NBD {nbd}: node plugin only; control {ports['control']} and metrics {ports['metrics']}: open")
PY
    fail "the NetworkPolicy does not do what deploy/README.md says"

echo "== backup schedules from a StorageClass (deploy/examples/backup-schedule.yaml)"
timed
sed -e 's/WaitForFirstConsumer/Immediate/' deploy/examples/backup-schedule.yaml | kubectl apply -f - >/dev/null
SC=strata-backed-up pvc sched-1 64Mi; bound sched-1
sched_ctl="$(kubectl -n "$ns" get service "strata-$(volume_of sched-1)" -o jsonpath='{.spec.clusterIP}'):10810"
serving "$(nbd_of sched-1)"
"$STRATA_BIN" volume status --controller "$sched_ctl" --json |
    python3 -c 'import json,sys; s=json.load(sys.stdin)["schedules"]; assert [(x["cron"], x["target"], x["retention"]["keep_daily"], x["retention"]["keep_weekly"]) for x in s] == [("0 3 * * *", "s3://my-bucket/strata", 7, 4)], s' ||
    fail "the volume controller does not run the StorageClass's backup schedule"
kubectl -n "$ns" get deployment "strata-$(volume_of sched-1)" -o jsonpath='{.spec.template.spec.containers[0].envFrom[0].secretRef.name}' | grep -qx strata-s3 ||
    fail "the volume controller does not get the backup Secret"
echo "   sched-1 bound and its controller runs the schedule ($(lap))"

echo "== snapshot"
timed
$k apply -f - >/dev/null <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap-1}
spec:
  volumeSnapshotClassName: strata
  source: {persistentVolumeClaimName: data-1}
YAML
$k wait --for jsonpath='{.status.readyToUse}'=true --timeout 120s volumesnapshot/snap-1 >/dev/null ||
    fail "snapshot not ready"
echo "   snap-1 ready in $(lap)"
# Written after the snapshot: must not be in the restore, must be in a later clone.
qemu-io -f raw -c "write -P 0x33 0 1M" -c flush "$uri" >/dev/null

echo "== restore and clone"
timed; pvc restore-1 64Mi VolumeSnapshot snap-1 snapshot.storage.k8s.io; bound restore-1
echo "   restore-1 bound in $(lap)"
timed; pvc clone-1 64Mi PersistentVolumeClaim data-1; bound clone-1
echo "   clone-1 bound in $(lap)"
serving "$(nbd_of restore-1)"
serving "$(nbd_of clone-1)"
qemu-io -f raw -c "read -P 0x5a 0 1M" -c "read -P 0xa5 63M 1M" "$(nbd_of restore-1)" | grep -q "read 1048576" ||
    fail "restore-1 does not hold the snapshot's data"
qemu-io -f raw -c "read -P 0x5a 0 1M" "$(nbd_of restore-1)" 2>&1 | grep -q "Pattern verification failed" &&
    fail "restore-1 content differs from the snapshot"
out="$(qemu-io -f raw -c "read -P 0x33 0 1M" -c "read -P 0xa5 63M 1M" "$(nbd_of clone-1)" 2>&1)" ||
    fail "cannot read clone-1: $out"
echo "$out" | grep -q "Pattern verification failed" && fail "clone-1 does not hold data-1's data: $out"

echo "== expand"
timed
$k patch pvc data-1 --type merge -p '{"spec":{"resources":{"requests":{"storage":"128Mi"}}}}' >/dev/null
$k wait --for jsonpath='{.status.capacity.storage}'=128Mi --timeout 120s pvc/data-1 >/dev/null ||
    fail "resize did not complete: $($k get pvc data-1 -o jsonpath='{.status}')"
echo "   data-1 at 128Mi in $(lap)"
size="$(qemu-img info --output json "$uri" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')"
[ "$size" = $((128 << 20)) ] || fail "the volume serves $size bytes after the resize"
qemu-io -f raw -c "write -P 0x77 127M 1M" -c "read -P 0x77 127M 1M" "$uri" >/dev/null || fail "cannot use the grown end"

pvc_status() { $k get pvc "$1" -o jsonpath="{.status.$2}"; }
echo "== expand a filesystem volume: strata's part, then the kubelet's"
MODE=Filesystem pvc fs-1 64Mi; bound fs-1
serving "$(nbd_of fs-1)"
timed
$k patch pvc fs-1 --type merge -p '{"spec":{"resources":{"requests":{"storage":"96Mi"}}}}' >/dev/null
$k wait --for jsonpath='{.status.allocatedResourceStatuses.storage}'=NodeResizePending \
    --timeout 120s pvc/fs-1 >/dev/null ||
    fail "fs-1 is not waiting for the node: $($k get pvc fs-1 -o jsonpath='{.status}')"
pvc_status fs-1 'conditions[*].type' | grep -qw FileSystemResizePending ||
    fail "fs-1 has no FileSystemResizePending condition: $($k get pvc fs-1 -o jsonpath='{.status}')"
[ "$(kubectl get pv "$(volume_of fs-1)" -o jsonpath='{.spec.capacity.storage}')" = 96Mi ] ||
    fail "fs-1's PV was not grown"
[ "$(pvc_status fs-1 'capacity.storage')" = 64Mi ] ||
    fail "fs-1's capacity changed before the node grew its filesystem"
size="$(qemu-img info --output json "$(nbd_of fs-1)" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')"
[ "$size" = $((96 << 20)) ] || fail "fs-1 serves $size bytes after the resize"
echo "   fs-1: volume and PV at 96Mi, waiting for the kubelet's NodeExpandVolume ($(lap))"

echo "== a resize strata refuses is recorded, and a valid one after it completes"
timed
$k patch pvc data-1 --type merge -p '{"spec":{"resources":{"requests":{"storage":"1Pi"}}}}' >/dev/null
$k wait --for jsonpath='{.status.allocatedResourceStatuses.storage}'=ControllerResizeInfeasible \
    --timeout 120s pvc/data-1 >/dev/null ||
    fail "1Pi was not recorded as infeasible: $($k get pvc data-1 -o jsonpath='{.status}')"
pvc_status data-1 'conditions[*].type' | grep -qw ControllerResizeError ||
    fail "no ControllerResizeError condition: $($k get pvc data-1 -o jsonpath='{.status}')"
$k get events --field-selector involvedObject.name=data-1,reason=VolumeResizeFailed \
    -o jsonpath='{.items[*].message}' | grep -q . || fail "no VolumeResizeFailed event on data-1"
echo "   1Pi refused: $($k get events --field-selector involvedObject.name=data-1,reason=VolumeResizeFailed -o jsonpath='{.items[0].message}' | cut -c1-160)"
# Kubernetes lets a user lower a request that failed, down to above the capacity.
$k patch pvc data-1 --type merge -p '{"spec":{"resources":{"requests":{"storage":"160Mi"}}}}' >/dev/null ||
    fail "the API server refused to lower the failed request"
$k wait --for jsonpath='{.status.capacity.storage}'=160Mi --timeout 120s pvc/data-1 >/dev/null ||
    fail "the resize after the refused one did not complete: $($k get pvc data-1 -o jsonpath='{.status}')"
pvc_status data-1 'conditions[*].type' | grep -q Resize &&
    fail "resize conditions left on data-1: $(pvc_status data-1 conditions)"
size="$(qemu-img info --output json "$uri" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')"
[ "$size" = $((160 << 20)) ] || fail "data-1 serves $size bytes after the second resize"
echo "   data-1 at 160Mi in $(lap)"

echo "== WaitForFirstConsumer: the consumer's node is preferred"
# deploy/'s StorageClass as it is. No scheduler runs here: the test sets the annotation the
# scheduler sets when it picks a node for the consuming pod.
kubectl apply -f deploy/base/storageclass.yaml >/dev/null 2>&1 ||
    { kubectl delete storageclass strata >/dev/null; kubectl apply -f deploy/base/storageclass.yaml >/dev/null; }
kubectl get storageclass strata -o jsonpath='{.volumeBindingMode}' | grep -q WaitForFirstConsumer ||
    fail "deploy's StorageClass is not WaitForFirstConsumer"
timed; pvc wffc-1 64Mi
$k annotate pvc wffc-1 volume.kubernetes.io/selected-node=node-3 >/dev/null
bound wffc-1; echo "   wffc-1 bound in $(lap) after the node was chosen"
wvol="$(volume_of wffc-1)"
[ "$(kubectl -n "$ns" get stratavolume "$wvol" -o jsonpath='{.spec.preferredNodes[0]}')" = node-3 ] ||
    fail "the consumer's node is not the volume's preferred node"
kubectl -n "$ns" get stratavolume "$wvol" -o jsonpath='{.spec.replicaNodes}' | grep -q node-3 ||
    fail "no replica on the consumer's node"
pref="$(kubectl -n "$ns" get deployment "strata-$wvol" \
    -o jsonpath='{.spec.template.spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0]}')"
{ echo "$pref" | grep -q '"weight":100' && echo "$pref" | grep -q '"node-3"'; } ||
    fail "the controller pod does not prefer the consumer's node: $pref"
$k delete pvc wffc-1 --timeout 120s >/dev/null

echo "== bad StorageClass parameters"
for bad in "typo:replica=3" "toomany:replicas=4"; do
    name="${bad%%:*}" kv="${bad#*:}"
    kubectl apply -f - >/dev/null <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: strata-$name}
provisioner: csi.strata.io
parameters: {${kv%%=*}: "${kv#*=}"}
YAML
    SC="strata-$name" pvc "bad-$name" 64Mi
done
sleep 5
for name in typo toomany; do
    [ "$($k get pvc "bad-$name" -o jsonpath='{.status.phase}')" = Pending ] || fail "bad-$name is not Pending"
done
$k get events --field-selector involvedObject.name=bad-typo -o jsonpath='{.items[*].message}' |
    grep -q 'unknown parameter "replica"' || fail "no clear event for an unknown parameter"
$k get events --field-selector involvedObject.name=bad-toomany -o jsonpath='{.items[*].message}' |
    grep -q '4 replicas need 4 nodes' || fail "no clear event for 4 replicas on 3 nodes"
echo "   refused with clear events; StrataVolumes now: $(kubectl -n "$ns" get stratavolumes --no-headers | wc -l) (expected 5: data-1, sched-1, restore-1, clone-1, fs-1)"
[ "$(kubectl -n "$ns" get stratavolumes --no-headers | wc -l)" = 5 ] || fail "a refused PVC left a StrataVolume"

echo "== delete everything"
timed
$k delete pvc bad-typo bad-toomany --wait=false >/dev/null
$k delete volumesnapshot snap-1 --timeout 120s >/dev/null || {
    kubectl get volumesnapshot -A -o yaml >&2; kubectl get volumesnapshotcontent -o yaml >&2
    fail "snap-1 was not deleted"
}
$k delete pvc restore-1 clone-1 data-1 sched-1 fs-1 --timeout 120s >/dev/null
for _ in $(seq 240); do
    [ "$(kubectl get pv --no-headers 2>/dev/null | wc -l)" = 0 ] &&
        [ "$(k8s_env_leftovers "$dir")" = "$K8S_ENV_CLEAN" ] && break
    sleep 0.5
done
left="$(k8s_env_leftovers "$dir") PVs=$(kubectl get pv --no-headers 2>/dev/null | wc -l)"
echo "   after $(lap): $left"
[ "$left" = "$K8S_ENV_CLEAN PVs=0" ] || fail "left behind: $left"

echo "== the provisioner's liveness endpoint, with deploy/'s flags"
# deploy/base/csi-controller.yaml probes /healthz/leader-election, which the provisioner
# serves only with --leader-election and --http-endpoint (as there, under deploy/'s RBAC).
# A second provisioner, started after everything above, to leave the flow's own unchanged.
"$CSI_PROVISIONER" --csi-address "$dir/controller.sock" --kubeconfig "$K8S_SA_KUBECONFIG" \
    --extra-create-metadata --leader-election --leader-election-namespace "$ns" --timeout 90s \
    --http-endpoint 127.0.0.1:8080 >"$dir/csi-provisioner-le.log" 2>&1 &
K8S_ENV_PIDS+=($!)
code=""
for _ in $(seq 120); do
    code="$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/healthz/leader-election || true)"
    [ "$code" = 200 ] && break
    sleep 0.5
done
[ "$code" = 200 ] || { tail "$dir/csi-provisioner-le.log" >&2; fail "/healthz/leader-election answered ${code:-nothing}"; }
echo "   /healthz/leader-election: 200"
echo "== flow passed"
