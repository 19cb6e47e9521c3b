#!/usr/bin/env python3
"""Runs the per-volume controller pods of strata's Deployments, in place of a
kubelet, for the CSI tests on a control plane without nodes.

What it does, and how that differs from a kubelet:
- Every 0.3 s it lists the Deployments labelled
  app.kubernetes.io/managed-by=strata-csi in the namespace. For each one that
  is not being deleted it runs the first container's exact command and
  arguments, with `strata` replaced by $STRATA_BIN (the binary the image
  would hold), and `$(VAR)` references expanded as the kubelet expands them.
- POD_IP (the Downward API's status.podIP) is the volume's Service cluster
  IP: the test runs in its own network namespace where the Service range is
  routed to `lo`, so the pod listens on the address clients dial, standing in
  for kube-proxy. Plain `value` env entries and envFrom Secrets are passed.
- A pod whose process exits is restarted after 1 s (restartPolicy Always).
- A Deployment that is gone or being deleted gets SIGTERM, then SIGKILL after
  its terminationGracePeriodSeconds.
- No Pod objects are written to the API; the Deployment's status is not
  updated.

Usage: pod-runner.py NAMESPACE LOG_DIR   (KUBECONFIG and STRATA_BIN set)
Stops when its parent exits, stopping every pod it started.
"""
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time

NS, LOG_DIR = sys.argv[1], sys.argv[2]
STRATA_BIN = os.environ["STRATA_BIN"]
PARENT = os.getppid()
SELECTOR = "app.kubernetes.io/managed-by=strata-csi"

running = {}  # deployment name -> (Popen, grace seconds, log file)
restart_after = {}


def kubectl_json(*args):
    r = subprocess.run(["kubectl", *args, "-o", "json"], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout)


def expand(s, env):
    # $(VAR) is replaced when VAR is defined; $$(VAR) escapes.
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


def start(d, cluster_ip):
    name = d["metadata"]["name"]
    spec = d["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = {"POD_IP": cluster_ip}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
    for ef in c.get("envFrom", []):
        ref = ef.get("secretRef")
        if ref:
            sec = kubectl_json("-n", NS, "get", "secret", ref["name"])
            if sec is None:
                print(f"pod-runner: {name}: secret {ref['name']} missing", flush=True)
                return
            for k, v in (sec.get("data") or {}).items():
                env[k] = base64.b64decode(v).decode()
    argv = [expand(a, env) for a in c.get("command", []) + c.get("args", [])]
    if argv and argv[0] == "strata":
        argv[0] = STRATA_BIN
    log = open(os.path.join(LOG_DIR, f"{name}.log"), "a")
    log.write(f"== pod-runner starts: {' '.join(argv)}\n")
    log.flush()
    p = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    running[name] = (p, spec.get("terminationGracePeriodSeconds", 30), log)
    print(f"pod-runner: started {name} (pid {p.pid}) on {cluster_ip}", flush=True)


def stop(name):
    p, grace, log = running.pop(name)
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    log.close()
    print(f"pod-runner: stopped {name} (exit {p.returncode})", flush=True)


def stop_all(*_):
    for name in list(running):
        stop(name)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop_all)
signal.signal(signal.SIGINT, stop_all)
os.makedirs(LOG_DIR, exist_ok=True)
while True:
    if os.getppid() != PARENT:
        stop_all()
    deps = kubectl_json("-n", NS, "get", "deployments", "-l", SELECTOR)
    svcs = kubectl_json("-n", NS, "get", "services", "-l", SELECTOR)
    if deps is not None and svcs is not None:
        ips = {s["metadata"]["name"]: s["spec"].get("clusterIP") for s in svcs["items"]}
        wanted = {}
        for d in deps["items"]:
            if not d["metadata"].get("deletionTimestamp"):
                wanted[d["metadata"]["name"]] = d
        for name in list(running):
            if name not in wanted:
                stop(name)
            elif running[name][0].poll() is not None:
                p, _, log = running.pop(name)
                log.close()
                print(f"pod-runner: {name} exited ({p.returncode}); restarting", flush=True)
                restart_after[name] = time.time() + 1
        for name, d in wanted.items():
            if name not in running and ips.get(name) and time.time() >= restart_after.get(name, 0):
                # A kubelet only runs pods that exist: look again right before starting.
                now = kubectl_json("-n", NS, "get", "deployment", name)
                if now is not None and not now["metadata"].get("deletionTimestamp"):
                    start(now, ips[name])
    time.sleep(0.3)
