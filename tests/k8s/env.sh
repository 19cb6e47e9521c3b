# Shared set-up of strata's Kubernetes tests (scripts/csi-sanity.sh, csi-k8s-flow.sh, csi-failover.sh),
# sourced. The caller runs in a network namespace of its own (k8s_env_netns re-executes it
# there) and calls k8s_env_up DIR, which starts:
# - etcd, kube-apiserver and kube-controller-manager (scripts/k8s-control-plane.sh);
# - the StrataVolume CRD, namespace strata-system, deploy/base/rbac-controller.yaml, and a
#   kubeconfig for the strata-csi-controller ServiceAccount (TokenRequest) in
#   $K8S_SA_KUBECONFIG, so strata runs with deploy/'s RBAC, not as an admin;
# - Node objects node-1..N (N: K8S_ENV_NODES, 3 by default; InternalIP 127.0.0.11..1N,
#   Ready: set by the test, no kubelet; k8s_env_node_add adds one later),
#   their CSINode objects (what the kubelet writes when strata's node plugin registers),
#   and a `strata replica serve` for each on IP:10900 (the replica DaemonSet's pods);
# - tests/k8s/pod-runner.py, which runs the volume controller Deployments' commands
#   (see its header for exactly what it does in place of a kubelet).
# Every process is added to K8S_ENV_PIDS; k8s_env_down stops them.
# shellcheck shell=bash

K8S_ENV_NS=strata-system
K8S_ENV_PIDS=()

# k8s_env_netns "$0" "$@": re-execute the calling script in a new network namespace where
# the Service range (10.233.0.0/24) is routed to lo, standing in for kube-proxy.
k8s_env_netns() {
    if [ -z "${STRATA_K8S_NETNS:-}" ]; then
        exec unshare --net env STRATA_K8S_NETNS=1 bash "$@"
    fi
    ip link set lo up
    ip route add local 10.233.0.0/24 dev lo
}

k8s_env_up() {
    local dir="$1" i
    : "${STRATA_BIN:=$PWD/target/release/strata}"
    export STRATA_BIN
    [ -x "$STRATA_BIN" ] || { echo "no $STRATA_BIN: cargo build --release --bin strata" >&2; return 1; }
    # shellcheck disable=SC1091
    . scripts/k8s-control-plane.sh
    k8s_start "$dir/k8s"
    export K8S_ADMIN_KUBECONFIG="$KUBECONFIG"
    kubectl create namespace "$K8S_ENV_NS" >/dev/null
    k8s_env_key "$dir"
    "$STRATA_BIN" csi crd | kubectl apply -f - 2>/dev/null >/dev/null
    kubectl wait --for condition=established --timeout 60s crd/stratavolumes.strata.io >/dev/null
    kubectl apply -f deploy/base/rbac-controller.yaml >/dev/null
    export K8S_SA_KUBECONFIG="$dir/controller.kubeconfig"
    k8s_sa_kubeconfig "$dir/k8s" "$K8S_ENV_NS" strata-csi-controller >"$K8S_SA_KUBECONFIG"
    for i in $(seq "${K8S_ENV_NODES:-3}"); do k8s_env_node_add "$dir" "$i"; done
    # The pods get the key from the Secret only, as on a real node.
    env -u STRATA_CLUSTER_KEY_FILE python3 tests/k8s/pod-runner.py ${K8S_ENV_POD_RUNNER_ARGS:-} \
        "$K8S_ENV_NS" "$dir/pods" \
        >"$dir/pod-runner.log" 2>&1 &
    K8S_ENV_PIDS+=($!)
}

# The cluster key (README, Security), by K8S_ENV_KEY:
# - secret (default): a new key stored in the Secret strata-cluster-key before anything starts
#   (as a user who brings their own key does); STRATA_CLUSTER_KEY_FILE is exported, so every
#   strata process the test starts holds it: replica servers, node plugins, CLI calls. Volume
#   controller pods get it only through their Secret volume (pod-runner does not pass it on).
# - csi: the CSI controller makes the Secret (deploy/'s path); k8s_env_key_fetch DIR reads it
#   into DIR/cluster.key and exports it once made.
# - none: keyless.
K8S_ENV_KEY_SECRET=strata-cluster-key
k8s_env_key() {
    local dir="$1"
    unset STRATA_CLUSTER_KEY_FILE
    case "${K8S_ENV_KEY:-secret}" in
    secret)
        "$STRATA_BIN" key init --out "$dir/cluster.key" >/dev/null
        kubectl -n "$K8S_ENV_NS" create secret generic "$K8S_ENV_KEY_SECRET" \
            --from-file=cluster.key="$dir/cluster.key" >/dev/null
        export STRATA_CLUSTER_KEY_FILE="$dir/cluster.key"
        ;;
    csi | none) ;;
    *) echo "K8S_ENV_KEY: secret, csi or none" >&2; return 1 ;;
    esac
}

# k8s_env_key_fetch DIR: waits (60 s at most) for the key Secret and exports its file.
k8s_env_key_fetch() {
    local dir="$1" i
    for i in $(seq 120); do
        if kubectl --kubeconfig "$K8S_ADMIN_KUBECONFIG" -n "$K8S_ENV_NS" get secret \
            "$K8S_ENV_KEY_SECRET" -o jsonpath='{.data.cluster\.key}' 2>/dev/null \
            | base64 -d >"$dir/cluster.key.tmp" && [ -s "$dir/cluster.key.tmp" ]; then
            chmod 600 "$dir/cluster.key.tmp"
            mv "$dir/cluster.key.tmp" "$dir/cluster.key"
            export STRATA_CLUSTER_KEY_FILE="$dir/cluster.key"
            return 0
        fi
        sleep 0.5
    done
    echo "no Secret $K8S_ENV_KEY_SECRET after 60 s" >&2
    return 1
}

# The arguments giving `strata csi` (controller or all) the key as deploy/ does.
k8s_env_csi_key_args() {
    [ "${K8S_ENV_KEY:-secret}" = none ] || echo "--cluster-key-secret $K8S_ENV_KEY_SECRET"
}

# k8s_env_node_add DIR I: Node node-I (InternalIP 127.0.0.1I, Ready), its CSINode, and its
# replica server (unless K8S_ENV_REPLICA_SERVERS=0).
k8s_env_node_add() {
    local dir="$1" i="$2" ip="127.0.0.1$2" now
    now="$(date -u +%FT%TZ)"
    kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Node
metadata:
  name: node-$i
  labels: {kubernetes.io/hostname: node-$i, kubernetes.io/arch: amd64, kubernetes.io/os: linux}
YAML
    kubectl patch node "node-$i" --subresource=status --type=merge -p \
        "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"$ip\"}],\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"Test\",\"message\":\"no kubelet: set by the test\",\"lastHeartbeatTime\":\"$now\",\"lastTransitionTime\":\"$now\"}]}}" >/dev/null
    # What the kubelet writes once the node plugin registered (NodeGetInfo's ID and
    # topology keys): the provisioner reads it for accessibility requirements.
    kubectl apply -f - >/dev/null <<YAML
apiVersion: storage.k8s.io/v1
kind: CSINode
metadata: {name: node-$i}
spec:
  drivers:
    - name: csi.strata.io
      nodeID: node-$i
      topologyKeys: [kubernetes.io/arch, kubernetes.io/hostname]
YAML
    # K8S_ENV_REPLICA_SERVERS=0: the replica DaemonSet's pods (run by pod-runner) instead
    [ "${K8S_ENV_REPLICA_SERVERS:-1}" = 0 ] || k8s_env_replica_start "$dir" "$i"
}

# k8s_env_replica_start DIR I: node-I's replica server (the replica DaemonSet's pod) on
# 127.0.0.1I:10900, data in DIR/replica-I; its pid in K8S_ENV_REPLICA_PIDS[I].
K8S_ENV_REPLICA_PIDS=()
k8s_env_replica_start() {
    local dir="$1" i="$2"
    mkdir -p "$dir/replica-$i"
    "$STRATA_BIN" replica serve --dir "$dir/replica-$i" --listen "127.0.0.1$i:10900" \
        >>"$dir/replica-$i.log" 2>&1 &
    K8S_ENV_PIDS+=($!)
    K8S_ENV_REPLICA_PIDS[i]=$!
}

# k8s_env_csi_controller DIR [snapshot-controller]: `strata csi --mode controller` on
# DIR/controller.sock with the strata-csi-controller ServiceAccount's kubeconfig (and
# K8S_ENV_CSI_ARGS), and the external-provisioner sidecar, as deploy/'s controller pod runs
# them (strata csi does the resizer's and snapshotter's work itself); with
# `snapshot-controller`, also the cluster's snapshot-controller (as admin).
k8s_env_csi_controller() {
    local dir="$1" sock="$1/controller.sock" sa="$K8S_SA_KUBECONFIG" s
    shift
    # shellcheck disable=SC2046
    env -u STRATA_CLUSTER_KEY_FILE KUBECONFIG="$sa" "$STRATA_BIN" csi --mode controller \
        --namespace "$K8S_ENV_NS" --endpoint "unix://$sock" --image strata:test \
        --controller-wait-secs 60 $(k8s_env_csi_key_args) ${K8S_ENV_CSI_ARGS:-} \
        >"$dir/csi-controller.log" 2>&1 &
    K8S_ENV_PIDS+=($!)
    k8s_env_wait_socket "$dir" controller
    "$CSI_PROVISIONER" --csi-address "$sock" --kubeconfig "$sa" --extra-create-metadata \
        --timeout 90s --v 2 >"$dir/csi-provisioner.log" 2>&1 &
    K8S_ENV_PIDS+=($!)
    for s in "$@"; do
        case "$s" in
        # a cluster component: runs as admin
        snapshot-controller) "$SNAPSHOT_CONTROLLER" --kubeconfig "$K8S_ADMIN_KUBECONFIG" --v 2 \
            >"$dir/snapshot-controller.log" 2>&1 & ;;
        *) echo "k8s_env_csi_controller: unknown component $s" >&2; return 1 ;;
        esac
        K8S_ENV_PIDS+=($!)
    done
}

# k8s_env_snapshot_crds: the VolumeSnapshot CRDs, all of them (without the group snapshot CRDs
# the snapshot-controller waits 30 s at start), established.
k8s_env_snapshot_crds() {
    kubectl apply -f "$SNAPSHOT_CRDS/snapshot.storage.k8s.io_volumesnapshotclasses.yaml" \
        -f "$SNAPSHOT_CRDS/snapshot.storage.k8s.io_volumesnapshotcontents.yaml" \
        -f "$SNAPSHOT_CRDS/snapshot.storage.k8s.io_volumesnapshots.yaml" \
        -f "$SNAPSHOT_CRDS/groupsnapshot.storage.k8s.io_volumegroupsnapshotclasses.yaml" \
        -f "$SNAPSHOT_CRDS/groupsnapshot.storage.k8s.io_volumegroupsnapshotcontents.yaml" \
        -f "$SNAPSHOT_CRDS/groupsnapshot.storage.k8s.io_volumegroupsnapshots.yaml" >/dev/null
    kubectl wait --for condition=established --timeout 60s \
        crd/volumesnapshots.snapshot.storage.k8s.io crd/volumesnapshotcontents.snapshot.storage.k8s.io \
        crd/volumesnapshotclasses.snapshot.storage.k8s.io >/dev/null
}

# k8s_env_wait_socket DIR NAME: wait for strata csi's socket DIR/NAME.sock
k8s_env_wait_socket() {
    local i
    for i in $(seq 100); do [ -S "$1/$2.sock" ] && return 0; sleep 0.1; done
    echo "strata csi ($2) did not start:" >&2
    tail "$1/csi-$2.log" >&2
    return 1
}

# What k8s_env_leftovers prints when nothing is left.
K8S_ENV_CLEAN="StrataVolumes=0 Deployments=0 Services=0 ConfigMaps=0 replica-dirs=0"
# k8s_env_leftovers DIR: StrataVolumes, Deployments, Services, ConfigMaps and replica directories left
k8s_env_leftovers() {
    local k="kubectl --kubeconfig $K8S_ADMIN_KUBECONFIG -n $K8S_ENV_NS"
    echo "StrataVolumes=$($k get stratavolumes --no-headers 2>/dev/null | wc -l)" \
        "Deployments=$($k get deployments --no-headers 2>/dev/null | wc -l)" \
        "Services=$($k get services --no-headers 2>/dev/null | wc -l)" \
        "ConfigMaps=$($k get configmaps -l app.kubernetes.io/managed-by=strata-csi --no-headers 2>/dev/null | wc -l)" \
        "replica-dirs=$(find "$1"/replica-* -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l)"
}

k8s_env_down() {
    set +e +o pipefail
    local p dir="$1"
    for p in "${K8S_ENV_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${K8S_ENV_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    # Anything a test left mounted or attached under DIR.
    grep -o " $dir[^ ]*" /proc/self/mounts 2>/dev/null | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
    local sd
    for sd in "$dir"/attach*; do
        [ -d "$sd" ] || continue
        "$STRATA_BIN" volume attachments --state-dir "$sd" 2>/dev/null | awk 'NR>1{print $1}' |
            while read -r d; do "$STRATA_BIN" volume detach "$d" --state-dir "$sd" >/dev/null 2>&1; done
    done
    return 0
}
