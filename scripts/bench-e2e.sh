#!/usr/bin/env bash
# The end-to-end performance and footprint benchmark (benches/e2e/main.rs):
# installs the tools it drives (fio, qemu-nbd/qemu-io, nbd-server, the DejaVu
# font for the chart) the same way scripts/test-all.sh does, builds the
# release binary and runs the benchmark. Results: target/bench-e2e/
# (results.json, results.md, chart.png).
#
# Usage: bash scripts/bench-e2e.sh            full run (about 12 minutes)
#        bash scripts/bench-e2e.sh --smoke    a few seconds per target (CI)
# Extra arguments go to the benchmark (see benches/e2e/opts.rs), e.g. --runtime 30.
# Fails when a server does not start, a server process dies, or fio errors;
# never on the performance numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/openssl-env.sh

need_apt=()
for tool in fio:fio qemu-nbd:qemu-utils qemu-io:qemu-utils nbd-server:nbd-server; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool#*:}")
done
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== installing: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

echo "== cargo build --release (strata and the benchmark)"
cargo build --release --quiet --bin strata
cargo bench --quiet --bench e2e --no-run
echo "== benchmark"
STRATA_BIN="$PWD/target/release/strata" cargo bench --quiet --bench e2e -- "$@"
