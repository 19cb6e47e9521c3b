#!/usr/bin/env bash
# Checks deploy/observability without Prometheus or Grafana (promtool is not
# available here): the dashboard JSON and the alert rules YAML parse, the
# four required alerts are there, every strata_* metric they use is one the
# code serves (a literal in a *.rs file), and the only other metrics are
# node-exporter's filesystem figures (strata serves no disk-space metric).
# Usage: bash scripts/observability-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import yaml' 2>/dev/null || {
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-yaml >/dev/null
}
served=$(grep -rhoE 'strata_[a-z0-9_]+' --include='*.rs' controller/src replica/src backup/src src | sort -u)
python3 - "$served" <<'PY'
import json, re, sys, yaml
served = set(sys.argv[1].split())
fail = []
dash = json.load(open("deploy/observability/grafana-dashboard.json"))
rules = yaml.safe_load(open("deploy/observability/alerts.yaml"))
exprs = []
def walk(p):
    for t in p.get("targets", []):
        exprs.append(("dashboard: " + p["title"], t["expr"]))
    for c in p.get("panels", []):
        walk(c)
for p in dash["panels"]:
    walk(p)
alerts = {}
for g in rules["groups"]:
    for r in g["rules"]:
        alerts[r["alert"]] = r
        exprs.append(("alert " + r["alert"], str(r["expr"])))
        for k in ("summary", "description"):
            if k not in r.get("annotations", {}):
                fail.append(f"alert {r['alert']}: no {k}")
for want in ("StrataVolumeDegraded", "StrataRebuildStalled", "StrataBackupFailed",
             "StrataBackupLate", "StrataReplicaDiskNearlyFull"):
    if want not in alerts:
        fail.append(f"no alert {want}")
functions = {"rate", "increase", "changes", "count_over_time", "time", "count", "by", "on",
             "ignoring", "and", "or", "unless", "max", "min", "sum", "label_values"}
used = set()
for where, e in exprs:
    for m in re.findall(r"\bstrata_[a-z0-9_]+", e):
        used.add(m)
        if m not in served:
            fail.append(f"{where}: {m} is not served by strata (no such name in the code)")
    for m in re.findall(r"\b([a-z_][a-z0-9_]*)\s*(?:\{|\[)", e):
        if not m.startswith("strata_") and m not in functions and not m.startswith("node_filesystem_"):
            fail.append(f"{where}: {m} is neither a strata metric nor node-exporter's filesystem figures")
unused = sorted(n for n in served if n not in used and re.match(r"strata_(volume|replica|backup)_", n))
print(f"observability: {len(exprs)} expressions ({len(alerts)} alerts, {len(dash['panels'])} panels), "
      f"{len(used)} strata metrics used" + ("" if fail else ", all served"))
if unused:
    print("   served but not shown: " + ", ".join(unused))
if fail:
    print("\n".join("FAIL: " + f for f in fail), file=sys.stderr)
    sys.exit(1)
PY
