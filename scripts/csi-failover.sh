#!/usr/bin/env bash
# A node dies under a volume's controller pod, with the real Kubernetes controllers doing
# their part: kube-controller-manager runs the deployment, replicaset, node-lifecycle,
# taint-eviction and pod-garbage-collector controllers (node-monitor-grace-period 10 s instead
# of 50 s, to keep the test short), and strata csi + external-provisioner provision the volume.
#
#   bash scripts/csi-failover.sh
#
# Checked, in order:
# 1. deploy/examples/mariadb.yaml is applied: the StatefulSet controller makes the PVC (3
#    replicas), strata provisions it, the Deployment's ReplicaSet makes the volume's controller
#    Pod, which runs on a node; mariadb-0 is bound to the same node (its container does not
#    run: no kubelet). Data is written and flushed through NBD at the Service address.
# 2. That node loses power: its Lease stops, the controller pod's process and the node's
#    replica server are killed. The node lifecycle controller marks it NotReady and taints it,
#    the taint-eviction controller evicts the controller pod after its 15 s toleration, the
#    ReplicaSet makes a new Pod, it starts on another node and assembles from the two other
#    replicas with a new epoch. The flushed data reads back; new writes are acknowledged.
#    The time from power loss to the volume serving again is printed.
# 3. mariadb-0 stays on the dead node (the StatefulSet waits: it cannot know the pod stopped)
#    until the user does what README, "When a node dies", says: `kubectl taint node NODE
#    node.kubernetes.io/out-of-service=...:NoExecute`. The pod-gc controller removes the stuck
#    Pods and the StatefulSet makes mariadb-0 again, bound to a live node.
# 4. The node comes back (replica server restarted, Lease renewed, taint removed): its stale
#    replica catches up and the StrataVolume reports 3 healthy replicas; every byte written
#    before and after the failover reads back.
# 5. With no fourth node, node-1's replica could not be replaced (the CSI controller says so).
#    Then node-4 joins and another node dies for good: after 20 s NotReady
#    (--replace-replica-after-secs; 600 s by default) its replica is replaced on node-4 and
#    rebuilt while the volume serves; the StrataVolume, the replica ConfigMap and a restarted
#    controller pod all use node-4; when the dead node returns, its left-over replica is deleted.
# 6. Deleting the PVC leaves no StrataVolume, Deployment, Service, ConfigMap or replica data.
#
# Nothing here runs a kubelet or a scheduler: tests/k8s/pod-runner.py --pods binds the strata
# Pods to nodes, runs their exact command, renews the live nodes' Leases and stands for a dead
# node by killing its processes and going quiet (see its header). A still-running controller
# behind a partition is fenced by the epoch (tests/recovery.rs,
# a_second_controller_fences_the_first): here the dead node's processes are gone.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. tests/k8s/env.sh
k8s_env_netns "$0" "$@"
dir="$(mktemp -d /tmp/strata-csi-failover.XXXXXX)"
echo "== work directory: $dir"
trap 'k8s_env_down "$dir"' EXIT
export K8S_KCM_MORE_CONTROLLERS="deployment-controller,replicaset-controller,statefulset-controller,node-lifecycle-controller,taint-eviction-controller,pod-garbage-collector-controller"
export K8S_KCM_EXTRA_ARGS="--node-monitor-grace-period=10s --node-monitor-period=1s"
export K8S_ENV_POD_RUNNER_ARGS="--pods"
# Replace a replica whose node is NotReady for 20 s (600 s by default).
export K8S_ENV_CSI_ARGS="--replace-replica-after-secs 20"
k8s_env_up "$dir"
ns="$K8S_ENV_NS"
kubectl apply -f deploy/base/csidriver.yaml >/dev/null
sed -e 's/WaitForFirstConsumer/Immediate/' deploy/base/storageclass.yaml | kubectl apply -f - >/dev/null
k8s_env_csi_controller "$dir"

k="kubectl -n default"
fail() {
    echo "FAIL: $*" >&2
    kubectl get nodes -o wide >&2 || true
    kubectl -n "$ns" get pods -o wide >&2 || true
    kubectl -n "$ns" get stratavolumes >&2 || true
    exit 1
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f s", b-a}'; }
serving() { # URI SECONDS
    local i
    for i in $(seq $(($2 * 4))); do qemu-img info "$1" >/dev/null 2>&1 && return 0; sleep 0.25; done
    return 1
}
controller_pod() { # the live (not deleted) controller Pod of the volume: NAME NODE
    kubectl -n "$ns" get pods -l "strata.io/volume=$vol" -o json |
        python3 -c 'import json,sys
for p in json.load(sys.stdin)["items"]:
    if not p["metadata"].get("deletionTimestamp") and p["spec"].get("nodeName") and p.get("status",{}).get("phase")=="Running":
        print(p["metadata"]["name"], p["spec"]["nodeName"]); break'
}
wait_for() { # SECONDS WHAT 'CONDITION' (shell code, evaluated every 0.5 s)
    local secs="$1" what="$2" i
    for i in $(seq $((secs * 2))); do eval "$3" >/dev/null 2>&1 && return 0; sleep 0.5; done
    fail "$what (after $secs s)"
}

echo "== MariaDB (deploy/examples/mariadb.yaml)"
kubectl apply -f deploy/examples/mariadb.yaml >/dev/null
wait_for 120 "pvc/data-mariadb-0 not bound" \
    '[ "$($k get pvc data-mariadb-0 -o jsonpath={.status.phase})" = Bound ]'
vol="$($k get pvc data-mariadb-0 -o jsonpath='{.spec.volumeName}')"
uri="$(kubectl get pv "$vol" -o jsonpath='{.spec.csi.volumeAttributes.strata\.io/nbd-uri}')"
wait_for 60 "no controller Pod runs" '[ -n "$(controller_pod)" ]'
read -r pod1 node1 <<<"$(controller_pod)"
echo "   controller pod $pod1 runs on $node1"
serving "$uri" 60 || fail "nothing serves $uri"
qemu-io -f raw -c "write -P 0x11 0 1M" -c "write -P 0x22 32M 1M" -c flush "$uri" >/dev/null ||
    fail "cannot write to $uri"
wait_for 60 "the StrataVolume never turned Ready" \
    '[ "$(kubectl -n "$ns" get stratavolume "$vol" -o jsonpath={.status.phase})" = Ready ]'
epoch1="$(kubectl -n "$ns" get stratavolume "$vol" -o jsonpath='{.status.epoch}')"
app_node() { $k get pod mariadb-0 -o jsonpath='{.spec.nodeName}' 2>/dev/null; }
wait_for 30 "mariadb-0 was not scheduled" '[ -n "$(app_node)" ]'
[ "$(app_node)" = "$node1" ] || fail "mariadb-0 is on $(app_node), not with its volume's controller on $node1"
app_uid="$($k get pod mariadb-0 -o jsonpath='{.metadata.uid}')"
echo "   mariadb-0 is on $node1 too"

echo "== $node1 loses power"
i="${node1#node-}"
t0=$(date +%s.%N)
echo "$node1" >>"$dir/pods/dead-nodes"
{ kill -KILL "${K8S_ENV_REPLICA_PIDS[$i]}" && wait "${K8S_ENV_REPLICA_PIDS[$i]}"; } 2>/dev/null || true
wait_for 60 "$node1 never became NotReady" \
    '[ "$(kubectl get node "$node1" -o jsonpath="{.status.conditions[?(@.type==\"Ready\")].status}")" != True ]'
echo "   $node1 NotReady after $(elapsed "$t0")"
for _ in $(seq 180); do
    read -r pod2 node2 <<<"$(controller_pod)" || true
    [ -n "${pod2:-}" ] && [ "$pod2" != "$pod1" ] && break
    sleep 0.5
done
[ -n "${pod2:-}" ] && [ "$pod2" != "$pod1" ] || fail "no new controller Pod"
[ "$node2" != "$node1" ] || fail "the new controller Pod went to the dead node"
serving "$uri" 60 || fail "the volume does not serve again"
echo "   serving again from $pod2 on $node2, $(elapsed "$t0") after the power loss"
qemu-io -f raw -c "read -P 0x11 0 1M" -c "read -P 0x22 32M 1M" "$uri" | grep -c "read 1048576" | grep -qx 2 ||
    fail "flushed data lost in the failover"
qemu-io -f raw -c "write -P 0x33 8M 1M" -c flush "$uri" >/dev/null || fail "no writes after the failover"
wait_for 30 "the StrataVolume does not show the new controller node" \
    '[ "$(kubectl -n "$ns" get stratavolume "$vol" -o jsonpath={.status.controllerNode})" = "$node2" ]'
epoch2="$(kubectl -n "$ns" get stratavolume "$vol" -o jsonpath='{.status.epoch}')"
[ "$epoch2" -gt "$epoch1" ] || fail "epoch did not move on: $epoch1 -> $epoch2"
echo "   epoch $epoch1 -> $epoch2; $(kubectl -n "$ns" get stratavolume "$vol" --no-headers)"

echo "== the user marks $node1 out of service"
[ "$($k get pod mariadb-0 -o jsonpath='{.metadata.uid}')" = "$app_uid" ] ||
    fail "mariadb-0 was replaced before the node was marked out of service"
t1=$(date +%s.%N)
kubectl taint node "$node1" node.kubernetes.io/out-of-service=nodeshutdown:NoExecute >/dev/null
wait_for 90 "mariadb-0 was not started again on another node" \
    '[ "$($k get pod mariadb-0 -o jsonpath={.metadata.uid})" != "$app_uid" ] && [ -n "$(app_node)" ] && [ "$(app_node)" != "$node1" ]'
echo "   mariadb-0 removed from $node1 and bound to $(app_node) $(elapsed "$t1") after the taint"
wait_for 30 "the old controller pod was not removed" '! kubectl -n "$ns" get pod "$pod1"'

echo "== $node1 comes back"
t2=$(date +%s.%N)
sed -i "/^$node1\$/d" "$dir/pods/dead-nodes"
k8s_env_replica_start "$dir" "$i"
kubectl taint node "$node1" node.kubernetes.io/out-of-service- >/dev/null
wait_for 120 "the volume never had 3 healthy replicas again" \
    '[ "$(kubectl -n "$ns" get stratavolume "$vol" -o jsonpath={.status.healthyReplicas}/{.status.phase})" = 3/Ready ]'
echo "   3 healthy replicas $(elapsed "$t2") after the node came back"
qemu-io -f raw -c "read -P 0x11 0 1M" -c "read -P 0x33 8M 1M" -c "read -P 0x22 32M 1M" "$uri" |
    grep -c "read 1048576" | grep -qx 3 || fail "data differs after the node came back"

# node-1 was NotReady longer than 20 s with no fourth node to move its replica to.
grep -q "no other node can take its place" "$dir/csi-controller.log" ||
    fail "no word in the CSI controller's log about the replica it could not replace"

victim=node-1; [ "$node2" = node-1 ] && victim=node-3
echo "== $victim is lost for good; node-4 joins"
k8s_env_node_add "$dir" 4
t3=$(date +%s.%N)
v="${victim#node-}"
echo "$victim" >>"$dir/pods/dead-nodes"
{ kill -KILL "${K8S_ENV_REPLICA_PIDS[$v]}" && wait "${K8S_ENV_REPLICA_PIDS[$v]}"; } 2>/dev/null || true
replica_nodes() { kubectl -n "$ns" get stratavolume "$vol" -o jsonpath='{.spec.replicaNodes[*]}'; }
wait_for 120 "the replica on $victim was not replaced by one on node-4" \
    'replica_nodes | grep -qw node-4 && ! replica_nodes | grep -qw "$victim"'
wait_for 120 "the volume never had 3 healthy replicas with node-4" \
    '[ "$(kubectl -n "$ns" get stratavolume "$vol" -o jsonpath={.status.healthyReplicas}/{.status.phase})" = 3/Ready ]'
echo "   replaced and rebuilt: 3 healthy replicas $(elapsed "$t3") after $victim died" \
    "(replicas on $(replica_nodes))"
kubectl -n "$ns" get configmap "strata-$vol" -o jsonpath='{.data.replicas}' | grep -q "127.0.0.14:10900" ||
    fail "the ConfigMap does not list node-4's replica"
qemu-io -f raw -c "read -P 0x11 0 1M" -c "read -P 0x33 8M 1M" -c "read -P 0x22 32M 1M" "$uri" |
    grep -c "read 1048576" | grep -qx 3 || fail "data differs after the replacement"

echo "== the controller pod restarts: it reads the new replica list"
read -r pod3 _ <<<"$(controller_pod)"
kubectl -n "$ns" delete pod "$pod3" --wait=false >/dev/null
wait_for 60 "no new controller pod after deleting $pod3" \
    '[ -n "$(controller_pod)" ] && [ "$(controller_pod | cut -d" " -f1)" != "$pod3" ]'
serving "$uri" 60 || fail "the volume does not serve after the restart"
wait_for 60 "not 3 healthy replicas after the restart" \
    '[ "$(kubectl -n "$ns" get stratavolume "$vol" -o jsonpath={.status.healthyReplicas}/{.status.phase})" = 3/Ready ]'
qemu-io -f raw -c "read -P 0x11 0 1M" -c "read -P 0x33 8M 1M" -c "read -P 0x22 32M 1M" "$uri" |
    grep -c "read 1048576" | grep -qx 3 || fail "data differs after the restart"

echo "== $victim comes back: its left-over replica is deleted"
sed -i "/^$victim\$/d" "$dir/pods/dead-nodes"
k8s_env_replica_start "$dir" "$v"
wait_for 60 "the left-over replica on $victim is still there" \
    '[ "$(find "$dir/replica-$v" -mindepth 1 -maxdepth 1 -type d | wc -l)" = 0 ]'

echo "== delete"
kubectl delete -f deploy/examples/mariadb.yaml --wait=false >/dev/null
$k delete pvc data-mariadb-0 --wait=false >/dev/null
wait_for 120 "objects or replica data left" \
    '[ "$(k8s_env_leftovers "$dir")" = "$K8S_ENV_CLEAN" ]'
echo "== failover: all checks passed"
