#!/usr/bin/env python3
"""Runs the per-volume controller pods of strata's Deployments, in place of a
kubelet, for the CSI tests on a control plane without nodes.

Two modes.

Deployment mode (default; scripts/csi-sanity.sh, scripts/csi-k8s-flow.sh):
- Every 0.3 s it lists the Deployments labelled
  app.kubernetes.io/managed-by=strata-csi in the namespace. For each one that
  is not being deleted it runs the first container's exact command and
  arguments, with `strata` replaced by $STRATA_BIN (the binary the image
  would hold), and `$(VAR)` references expanded as the kubelet expands them.
- A Deployment that is gone or being deleted gets SIGTERM, then SIGKILL after
  its terminationGracePeriodSeconds.
- No Pod objects are written to the API; the Deployment's status is not
  updated (no ReplicaSet controller runs in these tests).

Pod mode (--pods; scripts/csi-failover.sh, where kube-controller-manager runs
the deployment, replicaset, node-lifecycle, taint-eviction and pod-gc
controllers, so the Pods are the real ones those controllers make):
- Scheduler stand-in: a Pod without a node (any namespace) is bound (pods/binding) to
  a live node that is Ready and has no NoSchedule/NoExecute taint, the one
  scoring highest on the pod's preferred node affinity (matchExpressions with
  In on node labels), ties by name.
- Kubelet stand-in, per live node: renews the node's Lease in kube-node-lease
  every 2 s and sets its Ready condition back to True when it is not; runs
  strata's Pods bound to it as above and patches their status (Running,
  podIP, Ready); a Pod being deleted is stopped and then removed from the
  API (the kubelet's final delete). Other Pods (an application's) are bound
  and, when deleted, removed, but never run.
- A node named in LOG_DIR/dead-nodes (one per line, written by the test) has
  lost power: its pods' processes are SIGKILLed at once, its Lease is no
  longer renewed and nothing on it answers the API any more; Pods bound to
  it stay as the control plane leaves them. Removing the name brings the
  node back (an empty node: its old pods are not restarted, and their
  objects, when still there and being deleted, are removed).

In both modes:
- POD_IP (the Downward API's status.podIP) is the volume's Service cluster
  IP: the test runs in its own network namespace where the Service range is
  routed to `lo`, so the pod listens on the address clients dial, standing in
  for kube-proxy. (A volume has one controller pod at a time: Recreate, and
  a new pod after a node's death starts only once the old one's processes are
  gone.) Plain `value` env entries, configMapKeyRef entries (read when the
  pod starts, as the kubelet does) and envFrom Secrets are passed. A Secret
  volume is a directory of files written when the pod starts (a missing
  Secret holds the pod back), and an argument or env value under its
  mountPath is rewritten to it.
- A pod whose process exits is restarted after 1 s (restartPolicy Always).

Pod mode also runs the replica DaemonSet's Pods (label
app.kubernetes.io/name=strata-replica; scripts/csi-rolling-update.sh, where
the daemonset controller makes them):
- Scheduling honours nodeSelector and the required node affinity (the
  daemonset controller pins each Pod to its node with matchFields
  metadata.name; matchExpressions In/NotIn on labels).
- hostNetwork: the Pod's IP is the node's InternalIP; the Downward API's
  status.hostIP and status.podIP give it. A hostPath volume is the directory
  HOST_ROOT/NODE/PATH (HOST_ROOT: $POD_RUNNER_HOST_ROOT, LOG_DIR/hosts by
  default), and an argument under the volume's mountPath is rewritten to it.
- A container with a tcpSocket readinessProbe is Ready only once its port
  accepts a connection (checked every loop, 0.3 s), as the kubelet's probe
  would say; without one it is Ready when started.
- A Pod being deleted gets SIGTERM, SIGKILL after its
  terminationGracePeriodSeconds, then is removed from the API; the
  daemonset controller then makes the new one.

Usage: pod-runner.py [--pods] NAMESPACE LOG_DIR   (KUBECONFIG and STRATA_BIN set)
Stops when its parent exits, stopping every pod it started.
"""
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

ARGS = [a for a in sys.argv[1:] if a != "--pods"]
POD_MODE = "--pods" in sys.argv[1:]
NS, LOG_DIR = ARGS[0], ARGS[1]
STRATA_BIN = os.environ["STRATA_BIN"]
PARENT = os.getppid()
SELECTOR = "app.kubernetes.io/managed-by=strata-csi"
# Pods pod mode runs (label key, value): the volume controllers and the replica DaemonSet's.
RUN_LABELS = [("app.kubernetes.io/managed-by", "strata-csi"), ("app.kubernetes.io/name", "strata-replica")]
HOST_ROOT = os.environ.get("POD_RUNNER_HOST_ROOT") or os.path.join(LOG_DIR, "hosts")

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


def start(name, pod_spec, cluster_ip, node=None, host_ip=None):
    """Runs the pod's first container; returns its Popen or None."""
    c = pod_spec["containers"][0]
    env = {"POD_IP": cluster_ip}
    fields = {"status.podIP": cluster_ip, "status.hostIP": host_ip or cluster_ip, "spec.nodeName": node}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        fref = (e.get("valueFrom") or {}).get("fieldRef")
        if fref and fields.get(fref["fieldPath"]):
            env[e["name"]] = fields[fref["fieldPath"]]
        ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
        if ref:
            cm = kubectl_json("-n", NS, "get", "configmap", ref["name"])
            value = ((cm or {}).get("data") or {}).get(ref["key"])
            if value is None:
                print(f"pod-runner: {name}: configmap {ref['name']} key {ref['key']} missing", flush=True)
                return None
            env[e["name"]] = value
    for ef in c.get("envFrom", []):
        ref = ef.get("secretRef")
        if ref:
            sec = kubectl_json("-n", NS, "get", "secret", ref["name"])
            if sec is None:
                print(f"pod-runner: {name}: secret {ref['name']} missing", flush=True)
                return None
            for k, v in (sec.get("data") or {}).items():
                env[k] = base64.b64decode(v).decode()
    argv = [expand(a, env) for a in c.get("command", []) + c.get("args", [])]
    if argv and argv[0] == "strata":
        argv[0] = STRATA_BIN
    # Secret volumes: the Secret's entries as files (mode defaultMode) in
    # LOG_DIR/secrets/POD/VOLUME, read when the pod starts; a missing Secret
    # holds the pod back (looked at again 2 s later), as the kubelet does.
    secret_dirs = {}
    for v in pod_spec.get("volumes", []):
        src = v.get("secret")
        if not src:
            continue
        sec = kubectl_json("-n", NS, "get", "secret", src["secretName"])
        if sec is None:
            if src.get("optional"):
                continue
            print(f"pod-runner: {name}: secret {src['secretName']} missing", flush=True)
            restart_after[name] = time.time() + 2
            return None
        d = os.path.join(LOG_DIR, "secrets", name, v["name"])
        os.makedirs(d, exist_ok=True)
        for k, val in (sec.get("data") or {}).items():
            path = os.path.join(d, k)
            with open(path, "wb") as f:
                f.write(base64.b64decode(val))
            os.chmod(path, src.get("defaultMode", 0o644))
        secret_dirs[v["name"]] = d
    for m in c.get("volumeMounts", []):
        if m["name"] in secret_dirs:
            mp, d = m["mountPath"].rstrip("/"), secret_dirs[m["name"]]
            under = lambda a, mp=mp, d=d: d + a[len(mp):] if a == mp or a.startswith(mp + "/") else a
            argv = [under(a) for a in argv]
            env = {k: under(v) for k, v in env.items()}
    # hostPath volumes: a directory per node under HOST_ROOT
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod_spec.get("volumes", []) if "hostPath" in v}
    for m in c.get("volumeMounts", []):
        if m["name"] in host_paths and node:
            host = os.path.join(HOST_ROOT, node) + host_paths[m["name"]]
            os.makedirs(host, exist_ok=True)
            mp = m["mountPath"].rstrip("/")
            argv = [host + a[len(mp):] if a == mp or a.startswith(mp + "/") else a for a in argv]
    log = open(os.path.join(LOG_DIR, f"{name}.log"), "a")
    log.write(f"== pod-runner starts: {' '.join(argv)}\n")
    log.flush()
    p = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    running[name] = (p, pod_spec.get("terminationGracePeriodSeconds", 30), log)
    print(f"pod-runner: started {name} (pid {p.pid}) on {cluster_ip}", flush=True)
    return p


def readiness_port(pod_spec):
    """The port of the first container's tcpSocket readinessProbe, or None."""
    c = pod_spec["containers"][0]
    port = ((c.get("readinessProbe") or {}).get("tcpSocket") or {}).get("port")
    if isinstance(port, str):
        port = next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == port), None)
    return port


def answers(ip, port):
    try:
        with socket.create_connection((ip, port), timeout=0.2):
            return True
    except OSError:
        return False


def stop(name, kill=False):
    p, grace, log = running.pop(name)
    not_ready.discard(name)
    if p.poll() is None:
        if kill:
            p.kill()
        else:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    log.close()
    print(f"pod-runner: stopped {name} (exit {p.returncode})", flush=True)


def reap(name):
    """Forgets a pod whose process exited, to be restarted after 1 s."""
    p, _, log = running.pop(name)
    not_ready.discard(name)
    log.close()
    print(f"pod-runner: {name} exited ({p.returncode}); restarting", flush=True)
    restart_after[name] = time.time() + 1


def stop_all(*_):
    for name in list(running):
        stop(name)
    sys.exit(0)


def deployment_mode():
    deps = kubectl_json("-n", NS, "get", "deployments", "-l", SELECTOR)
    svcs = kubectl_json("-n", NS, "get", "services", "-l", SELECTOR)
    if deps is None or svcs is None:
        return
    ips = {s["metadata"]["name"]: s["spec"].get("clusterIP") for s in svcs["items"]}
    wanted = {}
    for d in deps["items"]:
        if not d["metadata"].get("deletionTimestamp"):
            wanted[d["metadata"]["name"]] = d
    for name in list(running):
        if name not in wanted:
            stop(name)
        elif running[name][0].poll() is not None:
            reap(name)
    for name, d in wanted.items():
        if name not in running and ips.get(name) and time.time() >= restart_after.get(name, 0):
            # A kubelet only runs pods that exist: look again right before starting.
            now = kubectl_json("-n", NS, "get", "deployment", name)
            if now is not None and not now["metadata"].get("deletionTimestamp"):
                start(name, now["spec"]["template"]["spec"], ips[name])


def kubectl(*args, stdin=None):
    r = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        print(f"pod-runner: kubectl {' '.join(args[:4])}...: {r.stderr.strip()}", flush=True)
    return r.returncode == 0


def dead_nodes():
    try:
        with open(os.path.join(LOG_DIR, "dead-nodes")) as f:
            return {line.strip() for line in f if line.strip()}
    except FileNotFoundError:
        return set()


def now_rfc3339(micro=False):
    t = time.time()
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return f"{base}.{int(t % 1 * 1e6):06d}Z" if micro else f"{base}Z"


def is_ready(node):
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in node.get("status", {}).get("conditions", []))


def heartbeat(nodes, dead):
    """The kubelet's Lease renewal and Ready condition, for live nodes."""
    leases = []
    for n in nodes:
        name = n["metadata"]["name"]
        if name in dead:
            continue
        leases.append({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                     "renewTime": now_rfc3339(micro=True)},
        })
        if not is_ready(n):
            now = now_rfc3339()
            kubectl("patch", "node", name, "--subresource=status", "--type=strategic", "-p", json.dumps({
                "status": {"conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "pod-runner: the node is back", "lastHeartbeatTime": now,
                    "lastTransitionTime": now}]}}))
    if leases:
        kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": leases}))


def schedulable(node, dead):
    if node["metadata"]["name"] in dead or not is_ready(node):
        return False
    return not any(t.get("effect") in ("NoSchedule", "NoExecute")
                   for t in node.get("spec", {}).get("taints", []) or [])


def affinity_score(pod, node):
    labels = node["metadata"].get("labels", {})
    aff = (pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}
    score = 0
    for term in aff.get("preferredDuringSchedulingIgnoredDuringExecution", []):
        exprs = term["preference"].get("matchExpressions", [])
        if exprs and all(e["operator"] == "In" and labels.get(e["key"]) in e.get("values", [])
                         for e in exprs):
            score += term["weight"]
    return score


def required_fit(pod, node):
    """nodeSelector and the required node affinity (matchFields metadata.name,
    matchExpressions In/NotIn): what the daemonset controller's Pods carry."""
    labels = node["metadata"].get("labels", {})
    if any(labels.get(k) != v for k, v in (pod["spec"].get("nodeSelector") or {}).items()):
        return False
    req = (((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {})
           .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = req.get("nodeSelectorTerms") or []
    if not terms:
        return True

    def ok(e, value):
        if e["operator"] == "In":
            return value in e.get("values", [])
        if e["operator"] == "NotIn":
            return value not in e.get("values", [])
        if e["operator"] == "Exists":
            return value is not None
        if e["operator"] == "DoesNotExist":
            return value is None
        return False
    return any(all(ok(e, labels.get(e["key"])) for e in t.get("matchExpressions", [])) and
               all(ok(e, node["metadata"]["name"] if e["key"] == "metadata.name" else None)
                   for e in t.get("matchFields", []))
               for t in terms)


def schedule(pod, nodes, dead):
    fit = [n for n in nodes if schedulable(n, dead) and required_fit(pod, n)]
    if not fit:
        return
    best = max(sorted(fit, key=lambda n: n["metadata"]["name"]),
               key=lambda n: affinity_score(pod, n))
    name, node = pod["metadata"]["name"], best["metadata"]["name"]
    ns = pod["metadata"]["namespace"]
    binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
               "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
    if kubectl("create", "--raw", f"/api/v1/namespaces/{ns}/pods/{name}/binding", "-f", "-",
               stdin=json.dumps(binding)):
        print(f"pod-runner: bound {name} to {node}", flush=True)


def service_ip(pod, svcs):
    labels = pod["metadata"].get("labels", {})
    for s in svcs:
        sel = s["spec"].get("selector") or {}
        if sel and all(labels.get(k) == v for k, v in sel.items()):
            return s["spec"].get("clusterIP")
    return None


node_of = {}  # pod name -> node it runs on
last_heartbeat = 0.0


def pod_mode():
    global last_heartbeat
    dead = dead_nodes()
    nodes = kubectl_json("get", "nodes")
    every_pod = kubectl_json("get", "pods", "--all-namespaces")
    svcs = kubectl_json("-n", NS, "get", "services", "-l", SELECTOR)
    if nodes is None or every_pod is None or svcs is None:
        return
    nodes, svcs = nodes["items"], svcs["items"]
    pods = [p for p in every_pod["items"] if p["metadata"]["namespace"] == NS
            and any(p["metadata"].get("labels", {}).get(k) == v for k, v in RUN_LABELS)]
    node_ip = {n["metadata"]["name"]: next((a["address"] for a in n.get("status", {}).get("addresses", [])
                                            if a["type"] == "InternalIP"), None) for n in nodes}
    # Other pods (an application's) are bound and, once deleted on a live
    # node, removed; they are never run.
    for p in every_pod["items"]:
        if p in pods:
            continue
        node = p["spec"].get("nodeName")
        if node in dead:
            continue
        if p["metadata"].get("deletionTimestamp"):
            if node:
                kubectl("-n", p["metadata"]["namespace"], "delete", "pod", p["metadata"]["name"],
                        "--grace-period=0", "--force", "--wait=false")
        elif not node:
            schedule(p, nodes, dead)
    if time.time() - last_heartbeat >= 2:
        heartbeat(nodes, dead)
        last_heartbeat = time.time()
    # A node that lost power: everything on it stops at once.
    for name in list(running):
        if node_of.get(name) in dead:
            stop(name, kill=True)
    by_name = {p["metadata"]["name"]: p for p in pods}
    for name in list(running):
        p = by_name.get(name)
        if p is None or p["metadata"].get("deletionTimestamp"):
            stop(name)
        elif running[name][0].poll() is not None:
            reap(name)
    for p in pods:
        name, node = p["metadata"]["name"], p["spec"].get("nodeName")
        if node in dead:
            continue
        if p["metadata"].get("deletionTimestamp"):
            if node and name not in running:
                # the kubelet's final delete once the containers are gone
                kubectl("-n", NS, "delete", "pod", name, "--grace-period=0", "--force", "--wait=false")
            continue
        if not node:
            schedule(p, nodes, dead)
            continue
        ip = node_ip.get(node) if p["spec"].get("hostNetwork") else service_ip(p, svcs)
        if name in running and name in not_ready:
            port = readiness_port(p["spec"])
            if answers(ip, port) and set_status(p, ip, True):
                not_ready.discard(name)
                print(f"pod-runner: {name} is ready ({ip}:{port} answers)", flush=True)
        if name in running or not ip or time.time() < restart_after.get(name, 0):
            continue
        if start(name, p["spec"], ip, node, node_ip.get(node)) is not None:
            node_of[name] = node
            ready = readiness_port(p["spec"]) is None
            if not ready:
                not_ready.add(name)
            set_status(p, ip, ready)


not_ready = set()  # started pods whose readiness probe has not passed yet


def set_status(p, ip, ready):
    now = now_rfc3339()
    r = "True" if ready else "False"
    host_ip = ip if p["spec"].get("hostNetwork") else None
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": now,
              "conditions": [{"type": t, "status": "True" if t in ("PodScheduled", "Initialized") else r,
                              "lastTransitionTime": now}
                             for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
              "containerStatuses": [{
                  "name": p["spec"]["containers"][0]["name"], "ready": ready, "started": True,
                  "restartCount": 0, "image": p["spec"]["containers"][0]["image"], "imageID": "",
                  "state": {"running": {"startedAt": now}}}]}
    if host_ip:
        status["hostIP"] = host_ip
        status["hostIPs"] = [{"ip": host_ip}]
    return kubectl("-n", NS, "patch", "pod", p["metadata"]["name"], "--subresource=status", "--type=merge",
                   "-p", json.dumps({"status": status}))


signal.signal(signal.SIGTERM, stop_all)
signal.signal(signal.SIGINT, stop_all)
os.makedirs(LOG_DIR, exist_ok=True)
while True:
    if os.getppid() != PARENT:
        stop_all()
    if POD_MODE:
        pod_mode()
    else:
        deployment_mode()
    time.sleep(0.3)
