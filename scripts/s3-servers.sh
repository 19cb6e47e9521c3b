#!/usr/bin/env bash
# Real S3-protocol servers on loopback for the backup tests and benchmark:
# moto (Python, broad API, no signature checks) and s3s-fs (Rust, checks
# SigV4 signatures). See ../shared/TOOLS.md.
#
#   bash scripts/s3-servers.sh install          # moto -> .ci-venv, s3s-fs -> .ci-tools
#   bash scripts/s3-servers.sh start DIR        # start both, print the endpoints
#   bash scripts/s3-servers.sh stop DIR
#
# or, sourced:  . scripts/s3-servers.sh; s3_install; s3_start DIR; ...; s3_stop DIR
# s3_install exports STRATA_MOTO_BIN and STRATA_S3SFS_BIN (the backup tests
# start their own servers from them); s3_start exports
# STRATA_S3_MOTO_ENDPOINT, STRATA_S3_S3SFS_ENDPOINT, and AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY / AWS_REGION matching s3s-fs's credentials; both
# servers get a bucket named "strata" (moto in memory, s3s-fs under DIR).
# Ports: STRATA_MOTO_PORT (default 9000), STRATA_S3SFS_PORT (default 9001).

S3_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
S3_ACCESS_KEY=strata-test-key
S3_SECRET_KEY=strata-test-secret

s3_install_moto() {
    if [ ! -x "$S3_ROOT/.ci-venv/bin/moto_server" ]; then
        echo "== installing moto into .ci-venv" >&2
        python3 -m venv "$S3_ROOT/.ci-venv" || return 1
        "$S3_ROOT/.ci-venv/bin/pip" install -q 'moto[s3]==5.2.5' 'flask>=3,<4' 'flask-cors>=6,<7' || return 1
    fi
    export STRATA_MOTO_BIN="$S3_ROOT/.ci-venv/bin/moto_server"
}

s3_install() {
    s3_install_moto || return 1
    if [ ! -x "$S3_ROOT/.ci-tools/bin/s3s-fs" ]; then
        echo "== installing s3s-fs into .ci-tools" >&2
        cargo install s3s-fs@0.14.1 --features binary --locked --root "$S3_ROOT/.ci-tools" --quiet || return 1
    fi
    export STRATA_MOTO_BIN="$S3_ROOT/.ci-venv/bin/moto_server"
    export STRATA_S3SFS_BIN="$S3_ROOT/.ci-tools/bin/s3s-fs"
}

# Waits until GET / on the port answers with one of the given HTTP codes.
_s3_wait() {
    local port=$1 codes=$2 i code
    for i in $(seq 1 300); do
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/" 2>/dev/null || true)
        case " $codes " in *" $code "*) return 0 ;; esac
        sleep 0.2
    done
    echo "S3 server on port $port did not become ready" >&2
    return 1
}

s3_start() {
    local dir=${1:?usage: s3_start DIR}
    local mport=${STRATA_MOTO_PORT:-9000} sport=${STRATA_S3SFS_PORT:-9001}
    s3_install || return 1
    mkdir -p "$dir/s3s-fs/strata"
    "$STRATA_MOTO_BIN" -H 127.0.0.1 -p "$mport" >"$dir/moto.log" 2>&1 &
    echo $! >"$dir/moto.pid"
    "$STRATA_S3SFS_BIN" --host 127.0.0.1 --port "$sport" --access-key "$S3_ACCESS_KEY" \
        --secret-key "$S3_SECRET_KEY" "$dir/s3s-fs" >"$dir/s3s-fs.log" 2>&1 &
    echo $! >"$dir/s3s-fs.pid"
    _s3_wait "$mport" "200" || { s3_stop "$dir"; return 1; }
    _s3_wait "$sport" "200 403" || { s3_stop "$dir"; return 1; }
    curl -s -o /dev/null -X PUT "http://127.0.0.1:$mport/strata"
    export STRATA_S3_MOTO_ENDPOINT="http://127.0.0.1:$mport"
    export STRATA_S3_S3SFS_ENDPOINT="http://127.0.0.1:$sport"
    export AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" AWS_REGION=us-east-1
    echo "moto    $STRATA_S3_MOTO_ENDPOINT   (bucket strata, any credentials)"
    echo "s3s-fs  $STRATA_S3_S3SFS_ENDPOINT   (bucket strata, key $S3_ACCESS_KEY / $S3_SECRET_KEY, data in $dir/s3s-fs)"
}

# s3_start_moto DIR: moto alone (the backup benchmark and the CSI backup flow need no second
# server), on STRATA_MOTO_PORT, with the bucket `strata`; exports STRATA_S3_MOTO_ENDPOINT and
# test credentials (moto checks none).
s3_start_moto() {
    local dir=${1:?usage: s3_start_moto DIR}
    local mport=${STRATA_MOTO_PORT:-9000}
    s3_install_moto || return 1
    mkdir -p "$dir"
    "$STRATA_MOTO_BIN" -H 127.0.0.1 -p "$mport" >"$dir/moto.log" 2>&1 &
    echo $! >"$dir/moto.pid"
    _s3_wait "$mport" "200" || { s3_stop "$dir"; return 1; }
    curl -s -o /dev/null -X PUT "http://127.0.0.1:$mport/strata"
    export STRATA_S3_MOTO_ENDPOINT="http://127.0.0.1:$mport"
    export AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" AWS_REGION=us-east-1
}

s3_stop() {
    local dir=${1:?usage: s3_stop DIR} f
    for f in "$dir/moto.pid" "$dir/s3s-fs.pid"; do
        if [ -f "$f" ]; then
            kill "$(cat "$f")" 2>/dev/null || true
            rm -f "$f"
        fi
    done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    case "${1:-}" in
        install) s3_install; echo "STRATA_MOTO_BIN=$STRATA_MOTO_BIN"; echo "STRATA_S3SFS_BIN=$STRATA_S3SFS_BIN" ;;
        start) s3_start "${2:?usage: $0 start DIR}" ;;
        stop) s3_stop "${2:?usage: $0 stop DIR}" ;;
        *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
    esac
fi
