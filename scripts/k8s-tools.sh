#!/usr/bin/env bash
# Builds the Kubernetes-side test tools of the CSI work (issues 16 and 17) from their Go
# modules, into a cache outside the clone keyed by tool and version:
#
#   ${STRATA_TOOLS_CACHE:-$HOME/.cache/strata-tools}/<tool>-<version>/<binary>
#
# A tool whose binaries are already there (built from the same wrapper go.mod/go.sum) is
# not rebuilt, so a rerun on the same machine takes a second or two. The paths are written
# to $CACHE/env.sh (KUBE_APISERVER=..., ETCD=..., CSI_SANITY=..., ...).
#
#   bash scripts/k8s-tools.sh             build what is missing, write and print env.sh
#   bash scripts/k8s-tools.sh --verify    also run csi-sanity --help and a control-plane
#                                         self-test (scripts/k8s-control-plane.sh selftest)
#   . scripts/k8s-tools.sh                the same build, then exports the variables into
#                                         the calling shell
#
# Every module comes from the Go module proxy; the wrapper modules in scripts/k8s-tools/
# pin each tool and all its dependencies (go.mod + go.sum, built with -mod=readonly).
# Builds run under `nice -n 19` (and idle IO class), GOMAXPROCS=1 and
# `flock /tmp/strata-go.lock`, so they use only idle CPU next to Rust builds and never
# two at once. Go 1.26 (the machine's, GOTOOLCHAIN=local) builds every tool below.
#
# Versions (pinned; newest served by the Go proxy on 2026-12 that build with Go 1.26):
#   csi-sanity              github.com/kubernetes-csi/csi-test/v5              v5.6.0
#   kube-apiserver,
#   kube-controller-manager k8s.io/kubernetes (staging modules at v0.37.2)     v1.37.2
#   etcd                    go.etcd.io/etcd/server/v3                          v3.6.17
#   csi-provisioner         github.com/kubernetes-csi/external-provisioner/v6  v6.4.0
#   snapshot-controller     github.com/kubernetes-csi/external-snapshotter/v8  v8.7.0
#     (+ the VolumeSnapshot CRDs from .../external-snapshotter/client/v8 config/crd/)
# Not built: the csi-snapshotter and csi-resizer sidecars. strata csi does their work
# itself (csi/src/controller/snapshotter.rs, resizer.rs), and deploy/ does not run them.
# Not buildable here: node-driver-registrar. Its module path has no /v2 suffix while its
# releases are tagged v2.x, so Go can name a release only by a pseudo-version, and the Go
# proxy reachable here serves no version of the module (HTTP 403 for the list, for v1 tags
# and for pseudo-versions of release commits; livenessprobe's the same). It is not needed
# without a kubelet; deploy/ pins its image. (strata csi serves /healthz itself, so deploy/
# runs no livenessprobe.)

_k8s_tools_main() {
    set -euo pipefail
    local here cache verify=0
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    cache="${STRATA_TOOLS_CACHE:-$HOME/.cache/strata-tools}"
    for arg in "$@"; do
        case "$arg" in
            --verify) verify=1 ;;
            -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; return 0 ;;
            *) echo "k8s-tools: unknown argument $arg" >&2; return 2 ;;
        esac
    done
    mkdir -p "$cache"

    command -v go >/dev/null || { echo "k8s-tools: go is not installed" >&2; return 1; }

    local k8s=v1.37.2
    # version info that the Kubernetes release build stamps in with -X (hack/lib/version.sh)
    local k8s_x=""
    local pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        k8s_x+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=37"
        k8s_x+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done

    # tool  version  wrapper-dir  extra-ldflags  binary=package...
    _k8s_tool csi-sanity v5.6.0 csi-sanity "-X main.VERSION=v5.6.0" \
        csi-sanity=github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
    _k8s_tool etcd v3.6.17 etcd "" \
        etcd=go.etcd.io/etcd/server/v3
    _k8s_tool kube-apiserver "$k8s" kubernetes "$k8s_x" \
        kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver
    _k8s_tool kube-controller-manager "$k8s" kubernetes "$k8s_x" \
        kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager
    _k8s_tool external-provisioner v6.4.0 external-provisioner "-X main.version=v6.4.0" \
        csi-provisioner=github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner
    _k8s_tool external-snapshotter v8.7.0 external-snapshotter "-X main.version=v8.7.0" \
        snapshot-controller=github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller

    local env="$cache/env.sh"
    cat >"$env.tmp" <<EOF
# written by strata's scripts/k8s-tools.sh; source it
export STRATA_TOOLS_CACHE='$cache'
export CSI_SANITY='$cache/csi-sanity-v5.6.0/csi-sanity'
export ETCD='$cache/etcd-v3.6.17/etcd'
export KUBE_APISERVER='$cache/kube-apiserver-$k8s/kube-apiserver'
export KUBE_CONTROLLER_MANAGER='$cache/kube-controller-manager-$k8s/kube-controller-manager'
export CSI_PROVISIONER='$cache/external-provisioner-v6.4.0/csi-provisioner'
export SNAPSHOT_CONTROLLER='$cache/external-snapshotter-v8.7.0/snapshot-controller'
export SNAPSHOT_CRDS='$cache/external-snapshotter-v8.7.0/crd'
export SNAPSHOT_RBAC='$cache/external-snapshotter-v8.7.0/rbac'
export CSI_PROVISIONER_RBAC='$cache/external-provisioner-v6.4.0/rbac'
export KUBECTL='$(command -v kubectl || echo kubectl)'
export K8S_VERSION='$k8s'
EOF
    mv "$env.tmp" "$env"
    echo "k8s-tools: $env"
    sed -n 's/^export //p' "$env"

    if [ "$verify" = 1 ]; then
        # shellcheck disable=SC1090
        . "$env"
        echo "k8s-tools: csi-sanity --help"
        "$CSI_SANITY" --help 2>&1 | grep -E 'csi.endpoint|testvolumeaccesstype' | head -3
        "$CSI_SANITY" -version
        bash "$here/k8s-control-plane.sh" selftest
    fi
}

# _k8s_tool TOOL VERSION WRAPPER-DIR LDFLAGS-X BINARY=PACKAGE...
_k8s_tool() {
    local tool="$1" version="$2" wrapper="$here/k8s-tools/$3" xflags="$4"
    shift 4
    local dest="$cache/$tool-$version" stamp spec missing=0
    # the wrapper's content without comments: a changed pin rebuilds, a changed comment does not
    stamp="$(cat "$wrapper/go.mod" "$wrapper/go.sum" | grep -v '^[[:space:]]*//' | sha256sum | cut -c1-16)"
    for spec in "$@"; do
        [ -x "$dest/${spec%%=*}" ] || missing=1
    done
    if [ "$missing" = 0 ] && [ "$(cat "$dest/.wrapper-sum" 2>/dev/null)" = "$stamp" ]; then
        echo "k8s-tools: $tool $version cached"
        return 0
    fi

    echo "k8s-tools: building $tool $version (nice 19, GOMAXPROCS=1, waits for /tmp/strata-go.lock)"
    local tmp="$dest.tmp.$$" start
    rm -rf "$tmp"
    mkdir -p "$tmp"
    start=$(date +%s)
    local idle=()
    command -v ionice >/dev/null && idle=(ionice -c 3)
    for spec in "$@"; do
        (
            cd "$wrapper"
            export GOFLAGS="-trimpath -buildvcs=false -mod=readonly" CGO_ENABLED=0 \
                GOMAXPROCS=1 GOTOOLCHAIN=local GOWORK=off
            nice -n 19 "${idle[@]}" flock /tmp/strata-go.lock \
                go build -ldflags="-s -w $xflags" -o "$tmp/${spec%%=*}" "${spec#*=}"
        ) || { echo "k8s-tools: building $tool $version failed" >&2; rm -rf "$tmp"; return 1; }
    done
    _k8s_tool_extras "$tool" "$wrapper" "$tmp"
    local took=$(( $(date +%s) - start ))
    {
        echo "tool=$tool version=$version built=$(date -u +%FT%TZ) seconds=$took"
        echo "go=$(go env GOVERSION) wrapper=$wrapper wrapper-sum=$stamp"
        for spec in "$@"; do echo "${spec%%=*}=${spec#*=} bytes=$(stat -c %s "$tmp/${spec%%=*}")"; done
    } >"$tmp/build-info.txt"
    echo "$stamp" >"$tmp/.wrapper-sum"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    echo "k8s-tools: built $tool $version in ${took}s"
}

# files that the tests take from a tool's module besides its binaries
_k8s_tool_extras() {
    local tool="$1" wrapper="$2" out="$3" dir
    _modir() { (cd "$wrapper" && GOFLAGS=-mod=readonly GOWORK=off go list -m -f '{{.Dir}}' "$1"); }
    case "$tool" in
        external-snapshotter)
            # CRDs live in the nested client/v8 module (the wrapper pins it to the same release)
            dir="$(_modir github.com/kubernetes-csi/external-snapshotter/client/v8)"
            mkdir -p "$out/crd" "$out/rbac"
            cp "$dir"/config/crd/*.yaml "$out/crd/"
            dir="$(_modir github.com/kubernetes-csi/external-snapshotter/v8)"
            cp "$dir"/deploy/kubernetes/csi-snapshotter/rbac-csi-snapshotter.yaml \
               "$dir"/deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml "$out/rbac/"
            chmod -R u+w "$out/crd" "$out/rbac"
            ;;
        external-provisioner)
            dir="$(_modir github.com/kubernetes-csi/external-provisioner/v6)"
            mkdir -p "$out/rbac"; cp "$dir"/deploy/kubernetes/rbac.yaml "$out/rbac/"; chmod -R u+w "$out/rbac"
            ;;
    esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    _k8s_tools_main "$@"
else
    # sourced: build in a subshell (so set -e stays out of the caller), then export
    if ( _k8s_tools_main "$@" ); then
        # shellcheck disable=SC1091
        . "${STRATA_TOOLS_CACHE:-$HOME/.cache/strata-tools}/env.sh"
    else
        echo "k8s-tools: failed" >&2
        return 1
    fi
fi
