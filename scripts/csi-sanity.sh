#!/usr/bin/env bash
# csi-sanity (the kubernetes-csi conformance suite) against `strata csi`, with real replica
# servers and a real control plane (etcd, kube-apiserver, kube-controller-manager), in a
# network namespace of its own.
#
#   bash scripts/csi-sanity.sh [mount|block|all]     (default: all)
#
# Each access type runs twice: against the split deployment shape (`--mode controller`
# and `--mode node`, two endpoints) and against `--mode all` (one endpoint): csi-sanity
# runs its whole-lifecycle node specs only when the node endpoint also offers the
# Controller service.
# What runs:
# - three Node objects, node-1..3, whose InternalIPs 127.0.0.11..13 are where three
#   `strata replica serve` processes listen (the replica DaemonSet's pods, host network);
# - `strata csi --mode controller` with the kubeconfig of the `strata-csi-controller`
#   ServiceAccount, bound to the ClusterRole and Role of deploy/ (so a missing permission
#   fails here), `strata csi --mode node` for node-1, and `strata csi --mode all` (same
#   identity) for the combined runs;
# - tests/k8s/pod-runner.py in place of a kubelet: it runs the exact command and
#   arguments of each volume controller Deployment strata creates, listening on the
#   Service's cluster IP (routed to lo in this namespace, standing in for kube-proxy);
# - csi-sanity (built by scripts/k8s-tools.sh) with the given access type. NodeStage
#   attaches with strata-attach: the kernel's nbd driver when this kernel has it, else
#   nbdfuse + a loop device; mkfs/mount are the host's.
# Results: junit XML and every process's log under the printed directory.
set -euo pipefail
cd "$(dirname "$0")/.."
here="$PWD"
types="${1:-all}"
[ "$types" = all ] && types="mount block"

if [ -z "${STRATA_CSI_NETNS:-}" ]; then
    exec unshare --net env STRATA_CSI_NETNS=1 bash "$0" "$@"
fi
ip link set lo up
ip route add local 10.233.0.0/24 dev lo

: "${STRATA_BIN:=$here/target/release/strata}"
export STRATA_BIN
[ -x "$STRATA_BIN" ] || { echo "no $STRATA_BIN: cargo build --release --bin strata" >&2; exit 1; }
# shellcheck disable=SC1091
. scripts/k8s-control-plane.sh
dir="$(mktemp -d /tmp/strata-csi-sanity.XXXXXX)"
echo "== csi-sanity work directory: $dir"
pids=()
cleanup() {
    local rc=$?
    set +e +o pipefail
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    # Anything csi-sanity left attached or mounted.
    grep -o " $dir[^ ]*" /proc/self/mounts 2>/dev/null | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    [ -d "$dir/attach" ] && STRATA_LOG=warn "$STRATA_BIN" volume attachments --state-dir "$dir/attach" 2>/dev/null | awk 'NR>1{print $1}' |
        while read -r d; do "$STRATA_BIN" volume detach "$d" --state-dir "$dir/attach" >/dev/null 2>&1 || true; done
    return $rc
}
trap cleanup EXIT

k8s_start "$dir/k8s"
ns=strata-system
kubectl create namespace "$ns" >/dev/null
"$STRATA_BIN" csi crd | kubectl apply -f - >/dev/null
kubectl wait --for condition=established --timeout 60s crd/stratavolumes.strata.io >/dev/null
kubectl apply -f deploy/base/rbac-controller.yaml >/dev/null
export KUBECONFIG_ADMIN="$KUBECONFIG"
k8s_sa_kubeconfig "$dir/k8s" "$ns" strata-csi-controller >"$dir/controller.kubeconfig"

for i in 1 2 3; do
    ip="127.0.0.1$i"
    kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Node
metadata:
  name: node-$i
  labels: {kubernetes.io/hostname: node-$i, kubernetes.io/arch: amd64, kubernetes.io/os: linux}
YAML
    kubectl patch node "node-$i" --subresource=status --type=merge -p \
        "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"$ip\"}],\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"Test\",\"message\":\"no kubelet: set by the test\",\"lastHeartbeatTime\":\"$(date -u +%FT%TZ)\",\"lastTransitionTime\":\"$(date -u +%FT%TZ)\"}]}}" >/dev/null
    mkdir -p "$dir/replica-$i"
    "$STRATA_BIN" replica serve --dir "$dir/replica-$i" --listen "$ip:10900" >"$dir/replica-$i.log" 2>&1 &
    pids+=($!)
done

python3 tests/k8s/pod-runner.py "$ns" "$dir/pods" >"$dir/pod-runner.log" 2>&1 &
pids+=($!)
KUBECONFIG="$dir/controller.kubeconfig" "$STRATA_BIN" csi --mode controller --namespace "$ns" \
    --endpoint "unix://$dir/controller.sock" --image strata:test --controller-wait-secs 30 \
    >"$dir/csi-controller.log" 2>&1 &
pids+=($!)
"$STRATA_BIN" csi --mode node --node-id node-1 --endpoint "unix://$dir/node.sock" --controller-wait-secs 30 \
    --attach-state-dir "$dir/attach" >"$dir/csi-node.log" 2>&1 &
pids+=($!)
KUBECONFIG="$dir/controller.kubeconfig" "$STRATA_BIN" csi --mode all --namespace "$ns" --node-id node-1 \
    --endpoint "unix://$dir/all.sock" --image strata:test --controller-wait-secs 30 \
    --attach-state-dir "$dir/attach-all" >"$dir/csi-all.log" 2>&1 &
pids+=($!)
for s in controller node all; do
    for _ in $(seq 100); do [ -S "$dir/$s.sock" ] && break; sleep 0.1; done
    [ -S "$dir/$s.sock" ] || { echo "strata csi ($s) did not start:" >&2; tail "$dir/csi-$s.log" >&2; exit 1; }
done

rc=0
for type in $types; do
    for shape in split all; do
        if [ "$shape" = split ]; then
            node="$dir/node.sock" controller="$dir/controller.sock"
        else
            node="$dir/all.sock" controller="$dir/all.sock"
        fi
        run="$type-$shape"
        echo "== csi-sanity: access type $type, $shape endpoints"
        mkdir -p "$dir/$run"
        set +e
        "$CSI_SANITY" \
            --csi.endpoint "$node" --csi.controllerendpoint "$controller" \
            --csi.testvolumeaccesstype "$type" \
            --csi.testvolumesize $((64 << 20)) --csi.testvolumeexpandsize $((96 << 20)) \
            --csi.mountdir "$dir/$run/target" --csi.stagingdir "$dir/$run/staging" \
            --ginkgo.junit-report "$dir/junit-$run.xml" --ginkgo.timeout 20m --ginkgo.no-color \
            >"$dir/sanity-$run.log" 2>&1
        sanity_rc=$?
        set -e
        [ "$sanity_rc" = 0 ] || rc=1
        grep -E "^(SUCCESS|FAIL)!" "$dir/sanity-$run.log" | tail -1
        grep -E "^\s*\[FAIL\]" "$dir/sanity-$run.log" | sort -u | head -40 || true
        # The skipped specs and why (csi-sanity's own reasons), one line each.
        python3 - "$dir/junit-$run.xml" <<'PY'
import collections, sys, xml.etree.ElementTree as ET
c = collections.Counter()
for tc in ET.parse(sys.argv[1]).iter("testcase"):
    s = tc.find("skipped")
    if s is not None:
        c[(s.get("message") or "").replace("skipped - ", "")] += 1
print("   skipped: " + ("; ".join(f"{n}x {m}" for m, n in sorted(c.items())) or "none"))
PY
    done
done
echo "== leftovers: StrataVolumes $(kubectl --kubeconfig "$KUBECONFIG_ADMIN" -n $ns get stratavolumes --no-headers 2>/dev/null | wc -l), Deployments $(kubectl --kubeconfig "$KUBECONFIG_ADMIN" -n $ns get deploy --no-headers 2>/dev/null | wc -l), replica dirs $(ls "$dir"/replica-*/ 2>/dev/null | grep -vc '^$\|:$' || true)"
exit $rc
