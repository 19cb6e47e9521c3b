#!/usr/bin/env bash
# An upgrade under a volume's running IO, in README's order ("On Kubernetes", Upgrading), with
# the real Kubernetes controllers doing their part: kube-controller-manager runs the
# daemonset, deployment and replicaset controllers; strata csi + external-provisioner
# provision the volume.
#
#   bash scripts/csi-rolling-update.sh      (about 2 minutes; loopback only)
#
# 1. deploy/base/replica.yaml is applied: the daemonset controller makes one replica Pod per
#    node (node-1..3) and tests/k8s/pod-runner.py runs them (their exact command, a data
#    directory per node for the hostPath, the cluster key Secret the CSI controller made as a
#    file, Ready once port 10900 answers). A PVC of 3 replicas
#    is provisioned; its controller Pod runs. tests/k8s/nbd-writer.py writes to the volume's
#    Service address without pause (200 distinct 4 KiB writes a second, a FLUSH every 8),
#    reconnecting and writing again whatever no FLUSH covered when a request fails.
# 2. The replica DaemonSet's template changes (`kubectl rollout restart`, as a new release
#    would). Its updateStrategy is OnDelete (deploy/base/replica.yaml says why), so, node by
#    node, as README tells users: delete the node's replica Pod, wait for the daemonset
#    controller's new Pod to be Ready, then for the StrataVolume to report every replica
#    healthy in a status written after that (the CSI controller writes it every 10 s). The
#    test also checks the volume's controller live (`strata volume status`) at that moment.
# 3. The CSI controller (strata csi + provisioner; processes here, a Deployment in deploy/) is
#    restarted: volumes do not notice.
# 4. The volume's controller Deployment is restarted (`kubectl rollout restart`, Recreate): the
#    deployment controller stops the old Pod, pod-runner SIGTERMs it, the new one assembles
#    with a higher epoch, the writer reconnects.
# 5. The writer stops and reads back every write a FLUSH acknowledged; no request failed in
#    steps 2 and 3, and what failed in step 4 (the connection closed) was retried; the volume
#    has 3 healthy replicas; the epoch rose. Printed: the longest
#    pause of the client's IO in each step, the epochs, the time of each step.
#
# Not here: the node plugin (its attach supervisor needs the kernel's nbd module; the VM test,
# scripts/vm-attach-test.sh, restarts the supervisor under fio), and a kubelet (pod-runner
# stands for it: see its header).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. tests/k8s/env.sh
k8s_env_netns "$0" "$@"
dir="$(mktemp -d /tmp/strata-csi-rolling.XXXXXX)"
echo "== work directory: $dir"
writer_pid=
cleanup() {
    [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null
    k8s_env_down "$dir"
}
trap cleanup EXIT
T0=$(date +%s.%N)
# node-lifecycle: it lifts the node.kubernetes.io/not-ready:NoSchedule taint every new Node gets
export K8S_KCM_MORE_CONTROLLERS="daemonset-controller,deployment-controller,replicaset-controller,node-lifecycle-controller"
export K8S_ENV_POD_RUNNER_ARGS="--pods"
export K8S_ENV_REPLICA_SERVERS=0
# deploy/'s key path: the CSI controller makes the strata-cluster-key Secret, the replica Pods
# wait for it and mount it, and so does the volume's controller Pod.
export K8S_ENV_KEY=csi
export POD_RUNNER_HOST_ROOT="$dir/hosts"
k8s_env_up "$dir"
ns="$K8S_ENV_NS"
kubectl apply -f deploy/base/csidriver.yaml >/dev/null
sed -e 's/WaitForFirstConsumer/Immediate/' deploy/base/storageclass.yaml | kubectl apply -f - >/dev/null
kubectl apply -f deploy/base/replica.yaml >/dev/null
k8s_env_csi_controller "$dir"
csi_pids=("${K8S_ENV_PIDS[@]: -2}") # strata csi, external-provisioner
k8s_env_key_fetch "$dir" # for this script's own `strata volume status`

fail() {
    echo "FAIL: $*" >&2
    kubectl -n "$ns" get pods -o wide >&2 || true
    kubectl -n "$ns" get ds,stratavolumes >&2 || true
    [ -f "$dir/writer.out" ] && cat "$dir/writer.out" >&2
    exit 1
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="${2:-$(now)}" 'BEGIN{printf "%.1f", b-a}'; }
wait_for() { # SECONDS WHAT 'CONDITION' (shell code, evaluated every 0.5 s)
    local secs="$1" what="$2" i
    for i in $(seq $((secs * 2))); do eval "$3" >/dev/null 2>&1 && return 0; sleep 0.5; done
    fail "$what (after $secs s)"
}
ds_ready() { # every replica Pod updated and Ready
    kubectl -n "$ns" get ds strata-replica -o jsonpath='{.status.desiredNumberScheduled} {.status.updatedNumberScheduled} {.status.numberReady}' |
        awk '$1==3 && $2==3 && $3==3 {ok=1} END{exit !ok}'
}
replica_pod() { # NODE: the name of the replica Pod on NODE that is not being deleted, and Ready
    kubectl -n "$ns" get pods -l app.kubernetes.io/name=strata-replica -o json | python3 -c 'import json,sys
for p in json.load(sys.stdin)["items"]:
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))
    if p["spec"].get("nodeName") == sys.argv[1] and not p["metadata"].get("deletionTimestamp") and ready:
        print(p["metadata"]["name"])' "$1"
}
sv() { kubectl -n "$ns" get stratavolume "$vol" -o jsonpath="$1"; }
sv_healthy() { [ "$(sv '{.status.healthyReplicas}/{.status.totalReplicas}/{.status.phase}')" = 3/3/Ready ]; }
live() { "$STRATA_BIN" volume status --controller "$host:10810" --json 2>/dev/null; }
live_epoch() { live | python3 -c 'import json,sys; print(json.load(sys.stdin)["epoch"])'; }
live_healthy() { # the controller itself says: 3 replicas, all healthy
    live | python3 -c 'import json,sys
s = json.load(sys.stdin)
r = s["replicas"]
ok = len(r) == 3 and all(x.get("state", x.get("health")) in ("healthy", "Healthy") for x in r)
sys.exit(0 if ok else 1)'
}
# The client's longest pause (ms) between FROM and TO (unix times), from its per-second log.
pause() { local b="${2:-$(now)}"; awk -v a="${1%.*}" -v b="${b%.*}" '$1>=a && $1<=b && $2>m {m=$2} END{printf "%.0f ms", m}' "$dir/writer/gaps"; }

echo "== replica DaemonSet (deploy/base/replica.yaml) and a 3-replica volume"
wait_for 60 "the replica DaemonSet's Pods are not all Ready" ds_ready
kubectl apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: rolling, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: strata
  resources: {requests: {storage: 1Gi}}
YAML
wait_for 120 "pvc/rolling not bound" \
    '[ "$(kubectl -n default get pvc rolling -o jsonpath={.status.phase})" = Bound ]'
vol="$(kubectl -n default get pvc rolling -o jsonpath='{.spec.volumeName}')"
uri="$(kubectl get pv "$vol" -o jsonpath='{.spec.csi.volumeAttributes.strata\.io/nbd-uri}')"
hostport="${uri#nbd://}"; hostport="${hostport%%/*}"; host="${hostport%:*}"; port="${hostport##*:}"
export_name="${uri##*/}"
wait_for 90 "the volume's controller does not serve $uri" 'live_healthy'
wait_for 60 "the StrataVolume is not Ready with 3 healthy replicas" sv_healthy
echo "   $vol: $uri, epoch $(live_epoch), replicas:" \
    "$(live | python3 -c 'import json,sys; print(" ".join(r["address"] + "=" + r["state"] for r in json.load(sys.stdin)["replicas"]))')"

mkdir -p "$dir/writer"
python3 tests/k8s/nbd-writer.py "$host" "$port" "$export_name" "$dir/writer" >"$dir/writer.out" 2>&1 &
writer_pid=$!
acked() { cat "$dir/writer/acked" 2>/dev/null || echo 0; }
failures() { cat "$dir/writer/failures" 2>/dev/null || echo 0; }
wait_for 20 "the writer does not write" '[ "$(acked)" -gt 100 ]'
sleep 3
epoch0="$(live_epoch)"
report=()

echo "== rolling update of the replica DaemonSet, node by node (updateStrategy OnDelete)"
kubectl -n "$ns" rollout restart daemonset strata-replica >/dev/null
sleep 1
updated="$(kubectl -n "$ns" get ds strata-replica -o jsonpath='{.status.updatedNumberScheduled}')"
[ "${updated:-0}" = 0 ] ||
    fail "the daemonset controller replaced replica Pods by itself"
for n in node-1 node-2 node-3; do
    t=$(now)
    e1="$(live_epoch)"
    a1="$(acked)"
    old="$(replica_pod "$n")"
    [ -n "$old" ] || fail "no Ready replica Pod on $n"
    # README's command
    kubectl -n "$ns" delete pod --field-selector "spec.nodeName=$n" -l app.kubernetes.io/name=strata-replica \
        --wait=false >/dev/null
    wait_for 60 "no new replica Pod Ready on $n" \
        'p="$(replica_pod "$n")"; [ -n "$p" ] && [ "$p" != "$old" ]'
    tready=$(now)
    # When the volume's controller itself has the replica back and caught up (a figure only).
    wait_for 60 "the controller never had 3 healthy replicas again after $n" live_healthy
    tlive=$(now)
    # README: wait for a status written after the new Pod is Ready (every 10 s), showing every
    # replica healthy.
    sleep "$(awk -v r="$tready" -v n="$(now)" 'BEGIN{d=r+11-n; print (d>0?d:0)}')"
    wait_for 120 "the StrataVolume never had 3 healthy replicas again after $n" sv_healthy
    live_healthy || fail "the StrataVolume said 3 healthy replicas, the controller did not"
    t2=$(now)
    a2="$(acked)"
    [ "$a2" -gt "$a1" ] || fail "the writer made no progress while $n's replica restarted"
    [ "$(failures)" = 0 ] || fail "a request failed while $n's replica restarted"
    e2="$(live_epoch)"
    line="replica on $n: new Pod Ready $(secs "$t" "$tready") s, resynced $(secs "$t" "$tlive") s, StrataVolume healthy $(secs "$t" "$t2") s; client's longest pause $(pause "$t" "$t2"); epoch $e1 -> $e2; $((a2 - a1)) writes acked"
    echo "   $line"
    report+=("$line")
done
wait_for 10 "the DaemonSet is not fully updated" ds_ready
echo "   DaemonSet: $(kubectl -n "$ns" get ds strata-replica -o jsonpath='{.status.updatedNumberScheduled} updated, {.status.numberReady} ready')"

echo "== the CSI controller restarts (strata csi + external-provisioner)"
t=$(now)
a1="$(acked)"
kill "${csi_pids[@]}"
wait "${csi_pids[@]}" 2>/dev/null || true
k8s_env_csi_controller "$dir"
sleep 12
wait_for 60 "not 3 healthy replicas after the CSI controller restart" sv_healthy
a2="$(acked)"
[ "$a2" -gt "$a1" ] || fail "the writer made no progress while the CSI controller restarted"
[ "$(failures)" = 0 ] || fail "a request failed while the CSI controller restarted"
line="CSI controller: client's longest pause $(pause "$t"); epoch $(live_epoch)"
echo "   $line"; report+=("$line")

echo "== the volume's controller Deployment restarts (rollout restart, Recreate)"
t=$(now)
e1="$(live_epoch)"
a1="$(acked)"
kubectl -n "$ns" rollout restart deployment "strata-$vol" >/dev/null
wait_for 120 "the new controller pod does not serve with a higher epoch" \
    '[ "$(live_epoch)" -gt "$e1" ] && live_healthy'
tserv=$(now)
wait_for 60 "the writer did not continue after the restart" '[ "$(acked)" -gt "$a1" ]'
sleep 12
wait_for 60 "the StrataVolume never had 3 healthy replicas after the controller restart" sv_healthy
e2="$(live_epoch)"
line="volume controller pod: serving again (3 healthy replicas) $(secs "$t" "$tserv") s; client's longest pause $(pause "$t"); epoch $e1 -> $e2"
echo "   $line"; report+=("$line")
[ "$(kubectl -n "$ns" get deployment "strata-$vol" -o jsonpath='{.status.updatedReplicas}')" = 1 ] ||
    fail "the Deployment's rollout did not finish"

echo "== the writer stops and reads back every acknowledged write"
touch "$dir/writer/stop"
for _ in $(seq 120); do kill -0 "$writer_pid" 2>/dev/null || break; sleep 0.5; done
wait "$writer_pid" || fail "the writer failed"
writer_pid=
out="$(tail -1 "$dir/writer.out")"
echo "   $out"
python3 - "$out" <<'PY' || fail "the writer's result"
import json, sys
s = json.loads(sys.argv[1])
assert s["bad_blocks"] == 0, f"{s['bad_blocks']} acknowledged writes did not read back"
assert s["acked"] > 1000, "too few writes"
print(f"   {s['acked']} acknowledged writes read back; {s['failures']} failed requests, all retried"
      f" after {s['reconnects']} reconnects; longest pause {s['max_gap_ms']} ms")
PY
sv_healthy || fail "the volume is not Ready with 3 healthy replicas at the end"
epoch_end="$(live_epoch)"
[ "$epoch_end" -gt "$epoch0" ] || fail "the epoch did not rise: $epoch0 -> $epoch_end"
echo "== the key is in force: keyless clients are refused"
nokey="$(env -u STRATA_CLUSTER_KEY_FILE "$STRATA_BIN" volume status --controller "$host:10810" 2>&1)" &&
    fail "a keyless client read the volume controller's status"
grep -q "requires the cluster key" <<<"$nokey" || fail "keyless status: $nokey"
# a keyless gRPC client (an HTTP/2 preface) at a replica Pod's port: GOAWAY with the reason
python3 - <<'PY' || fail "a replica server did not refuse a keyless gRPC client"
import socket
s = socket.create_connection(("127.0.0.11", 10900), timeout=5)
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
back = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    back += chunk
assert b"requires the cluster key" in back, back
PY
echo "   volume controller and replica server refuse a client without the key"
echo "== figures"
for l in "${report[@]}"; do echo "   $l"; done
echo "   epoch $epoch0 -> $epoch_end; total $(secs "$T0") s"
kubectl -n default delete pvc rolling --wait=false >/dev/null
echo "== rolling update: all checks passed"
