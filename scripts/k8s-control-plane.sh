#!/usr/bin/env bash
# A real Kubernetes control plane for strata's CSI tests: etcd + kube-apiserver (and, unless
# K8S_CONTROLLER_MANAGER=0, a kube-controller-manager with the volume, protection and
# garbage-collector controllers), on 127.0.0.1 only, built by scripts/k8s-tools.sh.
# No kubelet, no scheduler, no container engine.
#
# Sourced by tests:
#   . scripts/k8s-control-plane.sh
#   k8s_start "$dir"     # dir: a folder of the test's own (created if missing)
#   kubectl get ns       # k8s_start exports KUBECONFIG (admin: O=system:masters)
#   k8s_stop "$dir"
# or run:  bash scripts/k8s-control-plane.sh selftest   (start, check, apply the
#          VolumeSnapshot CRDs, stop; exits non-zero on any failure)
#
# What k8s_start leaves in DIR: kubeconfig (admin), pki/ (ca, apiserver serving cert,
# admin client cert, service-account key pair), etcd/ (data), *.log, *.pid, ports.env.
# It exports KUBECONFIG, K8S_KUBECONFIG, K8S_API_URL, K8S_ETCD_URL, K8S_DIR.
# Further identities: k8s_user_kubeconfig DIR USER [GROUP] > file (a client cert signed by
# the test CA) and k8s_sa_kubeconfig DIR NAMESPACE SERVICEACCOUNT > file (a TokenRequest
# token), for RBAC-limited runs.
#
# Knobs (environment): K8S_PORT_BASE (default 21000: etcd client +79, etcd peer +80,
# apiserver +443, controller-manager +257; the next free block of 10 ports is taken
# when one is in use, up to 20 tries), K8S_START_TIMEOUT (seconds, default 90),
# K8S_CONTROLLER_MANAGER=0|1, K8S_KCM_CONTROLLERS (or K8S_KCM_MORE_CONTROLLERS, added to the
# default list), K8S_KCM_EXTRA_ARGS, K8S_APISERVER_EXTRA_ARGS,
# K8S_KEEP_DATA=1 (k8s_stop keeps etcd's data).
# Cleanup: k8s_start adds k8s_stop to the caller's EXIT trap (keeping an existing trap; not
# when called in a subshell), and a watchdog stops the processes within 2 s once the calling
# (sub)shell is gone, even if it was killed without running its trap.

_k8s_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

_k8s_log() { echo "k8s-control-plane: $*" >&2; }

_k8s_env() {
    if [ -z "${KUBE_APISERVER:-}" ] || [ -z "${ETCD:-}" ]; then
        local env="${STRATA_TOOLS_CACHE:-$HOME/.cache/strata-tools}/env.sh"
        if [ ! -f "$env" ]; then
            _k8s_log "no $env: building the tools first"
            bash "$_k8s_here/k8s-tools.sh" >&2 || return 1
        fi
        # shellcheck disable=SC1090
        . "$env"
    fi
    local b
    for b in "$ETCD" "$KUBE_APISERVER"; do
        [ -x "$b" ] || { _k8s_log "missing $b (run scripts/k8s-tools.sh)"; return 1; }
    done
    command -v openssl >/dev/null || { _k8s_log "openssl is needed"; return 1; }
    command -v kubectl >/dev/null || { _k8s_log "kubectl is needed"; return 1; }
}

_k8s_port_busy() { ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }

_k8s_pick_ports() {
    local base="${K8S_PORT_BASE:-21000}" try p busy
    for try in $(seq 0 19); do
        busy=0
        for p in $((base + 79)) $((base + 80)) $((base + 443)) $((base + 257)); do
            _k8s_port_busy "$p" && busy=1
        done
        if [ "$busy" = 0 ]; then
            K8S_ETCD_PORT=$((base + 79)) K8S_ETCD_PEER_PORT=$((base + 80))
            K8S_API_PORT=$((base + 443)) K8S_KCM_PORT=$((base + 257))
            return 0
        fi
        base=$((base + 10))
    done
    _k8s_log "no free ports from ${K8S_PORT_BASE:-21000} on"
    return 1
}

# _k8s_cert DIR NAME CN [O] [EXT]: key + certificate signed by DIR/pki/ca
_k8s_cert() {
    local pki="$1/pki" name="$2" cn="$3" org="${4:-}" ext="${5:-extendedKeyUsage=clientAuth}"
    local subj="/CN=$cn"
    [ -n "$org" ] && subj="/O=$org$subj"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null &&
    printf '%s\n' "$ext" "keyUsage=critical,digitalSignature,keyEncipherment" >"$pki/$name.ext" &&
    openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
        -CAcreateserial -days 30 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null &&
    rm -f "$pki/$name.csr" "$pki/$name.ext"
}

_k8s_pki() {
    local pki="$1/pki"
    mkdir -p "$pki" && chmod 700 "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -keyout "$pki/ca.key" -out "$pki/ca.crt" -subj "/CN=strata-test-ca" 2>/dev/null || return 1
    _k8s_cert "$1" apiserver kube-apiserver "" \
        "$(printf '%s\n' 'extendedKeyUsage=serverAuth' \
            'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc')" || return 1
    _k8s_cert "$1" admin strata-admin system:masters || return 1
    _k8s_cert "$1" kube-controller-manager system:kube-controller-manager || return 1
    # service-account token signing pair
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null &&
    openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

# _k8s_kubeconfig DIR USER (then the credential lines on stdin) > file
_k8s_kubeconfig() {
    local dir="$1" user="$2" cred
    cred="$(cat)"
    cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: strata-test
  cluster:
    server: https://127.0.0.1:$K8S_API_PORT
    certificate-authority: $dir/pki/ca.crt
contexts:
- name: $user@strata-test
  context:
    cluster: strata-test
    user: $user
current-context: $user@strata-test
users:
- name: $user
  user:
$cred
EOF
}

# k8s_user_kubeconfig DIR USER [GROUP]: kubeconfig on stdout for a client-cert identity
k8s_user_kubeconfig() {
    local dir="$1" user="$2" group="${3:-}"
    # shellcheck disable=SC1091
    . "$dir/ports.env"
    _k8s_cert "$dir" "user-$user" "$user" "$group" || return 1
    printf '    client-certificate: %s\n    client-key: %s\n' \
        "$dir/pki/user-$user.crt" "$dir/pki/user-$user.key" | _k8s_kubeconfig "$dir" "$user"
}

# k8s_sa_kubeconfig DIR NAMESPACE SERVICEACCOUNT [DURATION]: kubeconfig on stdout with a
# TokenRequest token (the ServiceAccount must exist)
k8s_sa_kubeconfig() {
    local dir="$1" ns="$2" sa="$3" dur="${4:-2h}" token
    # shellcheck disable=SC1091
    . "$dir/ports.env"
    token="$(kubectl --kubeconfig "$dir/kubeconfig" -n "$ns" create token "$sa" --duration "$dur")" || return 1
    printf '    token: %s\n' "$token" | _k8s_kubeconfig "$dir" "system:serviceaccount:$ns:$sa"
}

# _k8s_spawn DIR NAME BINARY ARGS...: start in the background with a pid file
_k8s_spawn() {
    local dir="$1" name="$2"
    shift 2
    "$@" </dev/null >"$dir/$name.log" 2>&1 &
    echo $! >"$dir/$name.pid"
}

# _k8s_running PID: the process exists and is not a zombie (kill -0 succeeds on a zombie
# that its parent has not reaped yet)
_k8s_running() {
    local st
    st="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# _k8s_alive DIR NAME: the pid file's process is running and is still our binary
_k8s_alive() {
    local pid
    pid="$(cat "$1/$2.pid" 2>/dev/null)" || return 1
    [ -n "$pid" ] && _k8s_running "$pid" &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$1"
}

# _k8s_wait SECONDS WHAT DIR NAME COMMAND...: poll COMMAND until it succeeds
_k8s_wait() {
    local secs="$1" what="$2" dir="$3" name="$4" deadline
    shift 4
    deadline=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        # Running is enough here: just after _k8s_spawn the child may not have exec'd the
        # binary yet, and its cmdline is still this shell's (_k8s_alive would say "exited"
        # and the caller would stop a healthy control plane; seen once on a loaded machine).
        if ! _k8s_running "$(cat "$dir/$name.pid" 2>/dev/null)"; then
            _k8s_log "$name exited while waiting for $what; last lines of $dir/$name.log:"
            tail -n 20 "$dir/$name.log" >&2
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            _k8s_log "timed out after ${secs}s waiting for $what; last lines of $dir/$name.log:"
            tail -n 20 "$dir/$name.log" >&2
            return 1
        fi
        sleep 0.5
    done
}

_k8s_add_exit_trap() {
    local cmd="$1" old
    old="$(trap -p EXIT | sed -e "s/^trap -- '//" -e "s/' EXIT\$//" -e "s/'\\\\''/'/g")"
    if [ -n "$old" ]; then
        # shellcheck disable=SC2064
        trap "$cmd; $old" EXIT
    else
        # shellcheck disable=SC2064
        trap "$cmd" EXIT
    fi
}

# k8s_start DIR: start etcd, kube-apiserver (and kube-controller-manager); wait until ready
k8s_start() {
    local dir="${1:?usage: k8s_start DIR}" timeout="${K8S_START_TIMEOUT:-90}"
    _k8s_env || return 1
    mkdir -p "$dir" && dir="$(cd "$dir" && pwd)" || return 1
    if _k8s_alive "$dir" etcd || _k8s_alive "$dir" kube-apiserver; then
        _k8s_log "a control plane of $dir is already running"
        return 1
    fi
    _k8s_pick_ports || return 1
    cat >"$dir/ports.env" <<EOF
K8S_ETCD_PORT=$K8S_ETCD_PORT
K8S_ETCD_PEER_PORT=$K8S_ETCD_PEER_PORT
K8S_API_PORT=$K8S_API_PORT
K8S_KCM_PORT=$K8S_KCM_PORT
EOF
    _k8s_pki "$dir" || { _k8s_log "openssl failed"; return 1; }
    printf '    client-certificate: %s\n    client-key: %s\n' \
        "$dir/pki/admin.crt" "$dir/pki/admin.key" | _k8s_kubeconfig "$dir" strata-admin >"$dir/kubeconfig"
    printf '    client-certificate: %s\n    client-key: %s\n' \
        "$dir/pki/kube-controller-manager.crt" "$dir/pki/kube-controller-manager.key" |
        _k8s_kubeconfig "$dir" system:kube-controller-manager >"$dir/kcm.kubeconfig"

    # EXIT trap in the calling shell only: in a subshell, `trap -p` shows the parent's trap,
    # which a composed trap would then run a second time; the watchdog covers subshells
    [ "$BASHPID" = "$$" ] && _k8s_add_exit_trap "k8s_stop '$dir'"

    local etcd_url="http://127.0.0.1:$K8S_ETCD_PORT" peer="http://127.0.0.1:$K8S_ETCD_PEER_PORT"
    _k8s_spawn "$dir" etcd "$ETCD" --name strata-test --data-dir "$dir/etcd" \
        --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "strata-test=$peer" --initial-cluster-state new \
        --unsafe-no-fsync --log-level warn --quota-backend-bytes 1073741824
    # watchdog (started once etcd.pid exists; k8s_stop's removal of it ends the watchdog):
    # stops everything within 2 s once the calling (sub)shell is gone, even if it was
    # killed without running its EXIT trap
    local owner="$BASHPID"
    ( trap '' HUP INT
      while _k8s_running "$owner" && [ -f "$dir/etcd.pid" ]; do sleep 2; done
      if [ -f "$dir/etcd.pid" ]; then _k8s_cleanup "$dir"; fi ) </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/watchdog.pid"
    _k8s_wait "$timeout" "etcd health" "$dir" etcd curl -sf "$etcd_url/health" ||
        { k8s_stop "$dir"; return 1; }

    # --endpoint-reconciler-type none: v1.37 refuses a loopback advertise address for the
    # `kubernetes` Service's endpoints ("may not be in the loopback range"); no pod runs
    # here to use that Service, so nothing maintains its endpoints.
    # shellcheck disable=SC2086
    _k8s_spawn "$dir" kube-apiserver "$KUBE_APISERVER" \
        --etcd-servers "$etcd_url" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$K8S_API_PORT" \
        --endpoint-reconciler-type none \
        --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
        --client-ca-file "$dir/pki/ca.crt" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$dir/pki/sa.pub" \
        --service-account-signing-key-file "$dir/pki/sa.key" \
        --service-cluster-ip-range 10.233.0.0/24 \
        --authorization-mode RBAC --allow-privileged=true --profiling=false \
        --cert-dir "$dir/pki" ${K8S_APISERVER_EXTRA_ARGS:-}
    _k8s_wait "$timeout" "kube-apiserver /readyz" "$dir" kube-apiserver \
        kubectl --kubeconfig "$dir/kubeconfig" --request-timeout 5s get --raw /readyz ||
        { k8s_stop "$dir"; return 1; }

    if [ "${K8S_CONTROLLER_MANAGER:-1}" != 0 ] && [ -x "${KUBE_CONTROLLER_MANAGER:-}" ]; then
        # the controllers a volume's life needs without a kubelet: PV binding and expansion,
        # the PVC/PV protection finalizers, garbage collection of owned objects, namespaces,
        # service accounts and their tokens
        local controllers="${K8S_KCM_CONTROLLERS:-persistentvolume-binder-controller,persistentvolume-expander-controller,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller,clusterrole-aggregation-controller}${K8S_KCM_MORE_CONTROLLERS:+,$K8S_KCM_MORE_CONTROLLERS}"
        _k8s_spawn "$dir" kube-controller-manager "$KUBE_CONTROLLER_MANAGER" \
            --kubeconfig "$dir/kcm.kubeconfig" \
            --authentication-kubeconfig "$dir/kcm.kubeconfig" \
            --authorization-kubeconfig "$dir/kcm.kubeconfig" --authentication-skip-lookup \
            --bind-address 127.0.0.1 --secure-port "$K8S_KCM_PORT" --cert-dir "$dir/pki/kcm" \
            --leader-elect=false --use-service-account-credentials=true \
            --service-account-private-key-file "$dir/pki/sa.key" \
            --root-ca-file "$dir/pki/ca.crt" \
            --controllers "$controllers" --profiling=false ${K8S_KCM_EXTRA_ARGS:-}
        _k8s_wait "$timeout" "kube-controller-manager /healthz" "$dir" kube-controller-manager \
            curl -skf "https://127.0.0.1:$K8S_KCM_PORT/healthz" ||
            { k8s_stop "$dir"; return 1; }
    fi

    export K8S_DIR="$dir" KUBECONFIG="$dir/kubeconfig" K8S_KUBECONFIG="$dir/kubeconfig"
    export K8S_API_URL="https://127.0.0.1:$K8S_API_PORT" K8S_ETCD_URL="$etcd_url"
    _k8s_log "up: $K8S_API_URL (etcd $etcd_url), KUBECONFIG=$dir/kubeconfig"
}

# stops our processes (pid files of DIR only; the cmdline is checked before each kill)
_k8s_stop_procs() {
    local dir="$1" name pid i
    for name in kube-controller-manager kube-apiserver etcd; do
        _k8s_alive "$dir" "$name" || { rm -f "$dir/$name.pid"; continue; }
        pid="$(cat "$dir/$name.pid")"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 60); do
            _k8s_running "$pid" || break
            sleep 0.25
        done
        if _k8s_running "$pid"; then
            _k8s_log "$name did not stop in 15s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/$name.pid"
    done
}

# k8s_stop DIR: stop everything k8s_start started for DIR; removes etcd's data.
# Safe under set -e, and safe to call twice (the EXIT trap calls it again).
k8s_stop() {
    local dir="${1:?usage: k8s_stop DIR}"
    [ -d "$dir" ] || return 0
    dir="$(cd "$dir" && pwd)"
    local wd
    wd="$(cat "$dir/watchdog.pid" 2>/dev/null)" || true
    if [ -n "$wd" ]; then kill "$wd" 2>/dev/null || true; fi
    _k8s_cleanup "$dir"
}

_k8s_cleanup() {
    _k8s_stop_procs "$1"
    rm -f "$1/watchdog.pid"
    [ "${K8S_KEEP_DATA:-0}" = 1 ] || rm -rf "$1/etcd"
    return 0
}

_k8s_rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$(cat "$1")/status" 2>/dev/null; }

# the check that scripts/k8s-tools.sh --verify runs
k8s_selftest() {
    set -euo pipefail
    local dir t0 t1
    dir="$(mktemp -d /tmp/strata-k8s.XXXXXX)"
    # shellcheck disable=SC2064
    trap "k8s_stop '$dir'; rm -rf '$dir'" EXIT
    t0=$(date +%s.%N)
    k8s_start "$dir"
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "k8s-control-plane: started in %.1fs\n", b - a }'
    echo "readyz: $(kubectl get --raw /readyz)"
    kubectl version 2>&1 | sed 's/^/  /'
    echo "api-resources: $(kubectl api-resources --no-headers | wc -l) resources"
    kubectl apply -k "$SNAPSHOT_CRDS"
    kubectl wait --for condition=established --timeout 60s \
        crd/volumesnapshots.snapshot.storage.k8s.io \
        crd/volumesnapshotcontents.snapshot.storage.k8s.io \
        crd/volumesnapshotclasses.snapshot.storage.k8s.io
    kubectl api-resources --api-group snapshot.storage.k8s.io
    kubectl get volumesnapshots -A
    # admin identity is RBAC-checked: a user without bindings is refused
    k8s_user_kubeconfig "$dir" nobody >"$dir/nobody.kubeconfig"
    if kubectl --kubeconfig "$dir/nobody.kubeconfig" get pods -A >/dev/null 2>&1; then
        echo "RBAC: an unbound user could list pods" >&2; return 1
    fi
    echo "RBAC: unbound user refused, as it should be"
    kubectl create serviceaccount selftest >/dev/null
    k8s_sa_kubeconfig "$dir" default selftest >"$dir/sa.kubeconfig"
    kubectl --kubeconfig "$dir/sa.kubeconfig" auth whoami -o jsonpath='{.status.userInfo.username}'; echo
    if [ -f "$dir/kube-controller-manager.pid" ]; then
        # the PV binder runs: a static PV and a PVC bind without any driver
        kubectl apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: PersistentVolume
metadata: {name: selftest-pv}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: selftest
  csi: {driver: selftest.example.org, volumeHandle: v1}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: selftest-pvc, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: selftest
  resources: {requests: {storage: 1Gi}}
EOF
        kubectl wait --for jsonpath='{.status.phase}'=Bound --timeout 60s pvc/selftest-pvc
        kubectl delete pvc selftest-pvc --timeout 60s >/dev/null
        echo "PVC deleted (pvc-protection finalizer removed by the controller-manager)"
    fi
    sleep 5
    echo "idle RSS: etcd $(_k8s_rss_kib "$dir/etcd.pid") KiB, kube-apiserver $(_k8s_rss_kib "$dir/kube-apiserver.pid") KiB$(
        [ -f "$dir/kube-controller-manager.pid" ] && echo ", kube-controller-manager $(_k8s_rss_kib "$dir/kube-controller-manager.pid") KiB")"
    t0=$(date +%s.%N)
    k8s_stop "$dir"
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "k8s-control-plane: stopped in %.1fs\n", b - a }'
    echo "k8s-control-plane selftest: ok"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case "${1:-}" in
        selftest) k8s_selftest ;;
        *) echo "usage: bash $0 selftest   (or source it and call k8s_start DIR / k8s_stop DIR)" >&2; exit 2 ;;
    esac
fi
