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
types="${1:-all}"
[ "$types" = all ] && types="mount block"

# shellcheck disable=SC1091
. tests/k8s/env.sh
k8s_env_netns "$0" "$@"
dir="$(mktemp -d /tmp/strata-csi-sanity.XXXXXX)"
echo "== csi-sanity work directory: $dir"
trap 'k8s_env_down "$dir"' EXIT
k8s_env_up "$dir"
ns="$K8S_ENV_NS"
# shellcheck disable=SC2046
env -u STRATA_CLUSTER_KEY_FILE KUBECONFIG="$K8S_SA_KUBECONFIG" "$STRATA_BIN" csi --mode controller \
    --namespace "$ns" $(k8s_env_csi_key_args) \
    --endpoint "unix://$dir/controller.sock" --image strata:test --controller-wait-secs 30 \
    >"$dir/csi-controller.log" 2>&1 &
K8S_ENV_PIDS+=($!)
csi_controller_pid=$!
"$STRATA_BIN" csi --mode node --node-id node-1 --endpoint "unix://$dir/node.sock" --controller-wait-secs 30 \
    --attach-state-dir "$dir/attach" >"$dir/csi-node.log" 2>&1 &
K8S_ENV_PIDS+=($!)
csi_node_pid=$!
# shellcheck disable=SC2046
env -u STRATA_CLUSTER_KEY_FILE KUBECONFIG="$K8S_SA_KUBECONFIG" "$STRATA_BIN" csi --mode all \
    --namespace "$ns" --node-id node-1 $(k8s_env_csi_key_args) \
    --endpoint "unix://$dir/all.sock" --image strata:test --controller-wait-secs 30 \
    --attach-state-dir "$dir/attach-all" >"$dir/csi-all.log" 2>&1 &
K8S_ENV_PIDS+=($!)
for s in controller node all; do k8s_env_wait_socket "$dir" "$s"; done
kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
sleep 1
idle_controller="$(kib "$csi_controller_pid" VmRSS)" idle_node="$(kib "$csi_node_pid" VmRSS)"

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
# Footprint of the deployment shape's two processes: resident now (idle at start) and the
# peak over every run above.
echo "== strata csi RSS (KiB): controller idle $idle_controller, peak $(kib "$csi_controller_pid" VmHWM);" \
    "node idle $idle_node, peak $(kib "$csi_node_pid" VmHWM)"
left="$(k8s_env_leftovers "$dir")"
echo "== left behind: $left"
[ "$left" = "$K8S_ENV_CLEAN" ] || rc=1
exit $rc
