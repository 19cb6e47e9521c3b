#!/usr/bin/env bash
# strata's footprint on an idle cluster: the processes of every strata pod, run as the tests
# run them (tests/k8s/env.sh: 3 nodes, a real kube-apiserver, the CSI controller with the real
# external-provisioner (strata csi does the resizer's and snapshotter's work itself), a node
# plugin, 3 replica servers),
# with 5 volumes of 256 MiB, 64 MiB written to each. After 20 s idle it reads each process's
# memory (/proc/PID/status: VmRSS, and its split into RssAnon and RssFile) and its CPU over
# 30 s (/proc/PID/stat utime+stime), and prints a table: per process, and for the busiest
# storage node (a replica server, a node plugin and all 5 volume controllers), without and
# with the CSI controller pod (strata csi and the provisioner), which
# runs on one node of the cluster. Per node, two sums: RSS (counts a binary's text pages once
# per process) and resident (anonymous memory plus each binary's file pages once, which is
# what the node holds: the processes of one binary share its page-cache pages).
#
#   bash scripts/footprint.sh
#
# Fails when the resident memory of the storage node, or of the node that also runs the CSI
# controller pod, is 150 MiB or more. Not measured (not buildable here):
# node-driver-registrar (a small Go sidecar of the node pod); the kubelet and containerd are
# not strata's.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. tests/k8s/env.sh
k8s_env_netns "$0" "$@"
dir="$(mktemp -d /tmp/strata-footprint.XXXXXX)"
trap 'k8s_env_down "$dir"' EXIT
k8s_env_up "$dir"
ns="$K8S_ENV_NS"
kubectl apply -f deploy/base/csidriver.yaml -f deploy/base/rbac-sidecars.yaml >/dev/null
sed -e 's/WaitForFirstConsumer/Immediate/' deploy/base/storageclass.yaml | kubectl apply -f - >/dev/null
k8s_env_csi_controller "$dir"
"$STRATA_BIN" csi --mode node --node-id node-1 --endpoint "unix://$dir/node.sock" \
    --attach-state-dir "$dir/attach" >"$dir/csi-node.log" 2>&1 &
K8S_ENV_PIDS+=($!)
k8s_env_wait_socket "$dir" node

for i in 1 2 3 4 5; do
    kubectl -n default apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: fp-$i}
spec:
  storageClassName: strata
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 256Mi}}
YAML
done
for i in 1 2 3 4 5; do
    kubectl -n default wait --for jsonpath='{.status.phase}'=Bound --timeout 120s "pvc/fp-$i" >/dev/null
    vol="$(kubectl -n default get pvc "fp-$i" -o jsonpath='{.spec.volumeName}')"
    uri="$(kubectl get pv "$vol" -o jsonpath='{.spec.csi.volumeAttributes.strata\.io/nbd-uri}')"
    for _ in $(seq 120); do qemu-img info "$uri" >/dev/null 2>&1 && break; sleep 0.25; done
    qemu-io -f raw -c "write -P 0x5$i 0 64M" -c flush "$uri" >/dev/null
done
echo "== 5 volumes written; idle 20 s"
sleep 20

# pid -> label, from the command lines of this test's processes (those in this script's
# network namespace: a test running beside it has its own)
netns="$(readlink /proc/self/ns/net)"
declare -A label
for p in $(pgrep -f "$STRATA_BIN|$CSI_PROVISIONER"); do
    [ "$(readlink "/proc/$p/ns/net" 2>/dev/null)" = "$netns" ] || continue
    cmd="$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" || continue
    case "$cmd" in
    *"csi --mode controller"*) label[$p]="strata csi (controller)" ;;
    *"csi --mode node"*) label[$p]="strata csi (node)" ;;
    *"replica serve"*) label[$p]="strata replica server" ;;
    *"controller serve"*) label[$p]="strata volume controller" ;;
    "$CSI_PROVISIONER"*) label[$p]="csi-provisioner" ;;
    esac
done
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
kib() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$2/status"; }
declare -A t0
for p in "${!label[@]}"; do t0[$p]=$(ticks "$p"); done
sleep 30
hz=$(getconf CLK_TCK)
mib() { echo "$1 / 1024" | bc -l; }
# RSS counts a binary's resident text pages in every process that maps it; they are one set
# of page-cache pages (shared, and reclaimable under pressure). So a node's resident memory is
# its processes' anonymous memory plus each binary's file pages once (the largest RssFile of
# the processes running it).
printf '%-28s %6s %10s %10s %10s %8s\n' process count "RSS MiB" "anon MiB" "file MiB" "CPU %"
declare -A file_max
for name in "strata replica server" "strata volume controller" "strata csi (node)" \
    "strata csi (controller)" csi-provisioner; do
    n=0 rss=0 anon=0 file=0 cpu=0
    case "$name" in strata*) bin=strata ;; *) bin=$name ;; esac
    for p in "${!label[@]}"; do
        [ "${label[$p]}" = "$name" ] || continue
        r=$(kib VmRSS "$p") a=$(kib RssAnon "$p") f=$(kib RssFile "$p")
        c=$(( $(ticks "$p") - ${t0[$p]} ))
        n=$((n + 1)) rss=$((rss + r)) anon=$((anon + a)) file=$((file + f)) cpu=$((cpu + c))
        [ "$f" -gt "${file_max[$bin]:-0}" ] && file_max[$bin]=$f
    done
    [ "$n" -gt 0 ] || { echo "FAIL: no $name process found" >&2; exit 1; }
    printf '%-28s %6d %10.1f %10.1f %10.1f %8.2f\n' "$name" "$n" "$(mib "$rss")" "$(mib "$anon")" \
        "$(mib "$file")" "$(echo "100 * $cpu / $hz / 30" | bc -l)"
    # the busiest node: one replica server, one node plugin, all 5 volume controllers, and
    # (on the one node that runs it) the CSI controller pod (strata csi and the provisioner)
    case "$name" in
    "strata replica server") per=$((rss / n)) per_anon=$((anon / n)) ;;
    *) per=$rss per_anon=$anon ;;
    esac
    node_kib=$(( ${node_kib:-0} + per )) node_anon=$(( ${node_anon:-0} + per_anon ))
    case "$name" in
    "strata csi (controller)" | csi-*) ;;
    *) storage_kib=$(( ${storage_kib:-0} + per )) storage_anon=$(( ${storage_anon:-0} + per_anon )) ;;
    esac
done
storage_res=$((storage_anon + file_max[strata]))
node_res=$((node_anon + file_max[strata] + file_max[csi-provisioner]))
printf '%-40s %10s %10s\n' "" "RSS sum" "resident"
printf '%-40s %10.1f %10.1f\n' "node without the CSI controller pod" "$(mib "$storage_kib")" "$(mib "$storage_res")"
printf '%-40s %10.1f %10.1f\n' "node with it" "$(mib "$node_kib")" "$(mib "$node_res")"
# The gate is what the node holds (resident). The RSS sum counts the strata binary's text
# once per process, 9 times on the busiest node, and moves with the page cache's state (the
# kernel maps cached neighbours of each faulted page): 144 to 151 MiB for the same storage
# node between runs on this machine.
[ "$storage_res" -lt $((150 * 1024)) ] ||
    { echo "FAIL: strata's pods on a storage node hold 150 MiB or more" >&2; exit 1; }
[ "$node_res" -lt $((150 * 1024)) ] ||
    { echo "FAIL: the node that also runs the CSI controller pod holds 150 MiB or more" >&2; exit 1; }
echo "== footprint: under 150 MiB resident on a storage node with 5 volume controllers," \
    "and on the node that also runs the CSI controller pod"
