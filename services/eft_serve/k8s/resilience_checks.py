"""Offline checks that a rendered release has no single point of failure and runs hardened.

Owns, as functions of the parsed documents (each returns messages naming object and field):
`check_no_single_points` (proxies on every node, coordinators off the head on a group of ≥ 2
pods, GCS fault tolerance in a Redis that never evicts and is not the cache's), `check_budgets`
(no PodDisruptionBudget on the head, none that blocks drains, none that could evict a group's
only pod), `check_hardening` (Pod Security `restricted` namespaces and pods, read-only root
filesystems, no `ray stop` on preStop), `check_front` (the TLS Ingress speaks gRPC to the gRPC
Service, only its controller's namespace reaches the gRPC port, Prometheus may scrape what the
PodMonitor names) and `check_pod_monitor` (the shape of a monitoring.coreos.com/v1 PodMonitor,
whose CRD is not bundled).
Does NOT know: how manifests are rendered, nor the schema checks (`k8s.validate` calls these).
Used only by `k8s.validate`, which passes its own pod-template and selector helpers in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import yaml

Doc = dict[str, Any]
PodTemplate = tuple[str, dict[str, str], dict[str, Any]]
Selects = Callable[[dict[str, Any], dict[str, str]], bool]

RESTRICTED = "restricted"
GRPC_BACKEND_ANNOTATION = "nginx.ingress.kubernetes.io/backend-protocol"


def _name(doc: Doc) -> str:
    meta = doc.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{doc.get('kind', '?')}/{ns}{meta.get('name', '?')}"


def _resources(group: dict[str, Any]) -> dict[str, Any]:
    raw = (group.get("rayStartParams") or {}).get("resources")
    try:
        parsed = yaml.safe_load(str(raw).strip("'\"` ")) if raw else {}
    except yaml.YAMLError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _serve_config(rs: Doc) -> dict[str, Any]:
    try:
        data = yaml.safe_load((rs.get("spec") or {}).get("serveConfigV2") or "")
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _cluster(rs: Doc) -> dict[str, Any]:
    return (rs.get("spec") or {}).get("rayClusterConfig") or {}


# ---------------------------------------------------------------------------- single points


def check_no_single_points(rs: Doc, docs: Sequence[Doc]) -> list[str]:
    serve = _serve_config(rs)
    rc = _cluster(rs)
    problems: list[str] = []
    location = serve.get("proxy_location", "EveryNode")  # Serve's own default
    if location != "EveryNode":
        problems.append(
            f"serveConfigV2 proxy_location is {location!r}: with one proxy, losing its pod stops every "
            "stream; use EveryNode (a proxy on every pod with a replica, all behind the gRPC Service)"
        )
    coordinator = next(
        (a for a in serve.get("applications") or [] if isinstance(a, dict) and "config" in (a.get("args") or {})),
        None,
    )
    if coordinator is not None:
        replica = ((coordinator["args"]["config"].get("coordinator") or {}).get("replica")) or {}
        auto = replica.get("autoscaling") or None
        least = int(auto.get("min_replicas", 1)) if auto else int(replica.get("num_replicas", 1))
        if least < 2:
            problems.append(f"coordinator: at least 2 replicas needed, the config allows {least}")
        res = replica.get("node_group_resource")
        head = rc.get("headGroupSpec") or {}
        if res and res in _resources(head):
            problems.append(f"coordinator: resource {res!r} is advertised by the head: coordinators must run off it")
        owners = [g for g in rc.get("workerGroupSpecs") or [] if res and res in _resources(g)]
        if not res or len(owners) != 1:
            problems.append(
                f"coordinator: resource {res!r} must be advertised by exactly one worker group, "
                f"found {[g.get('groupName') for g in owners] or 'none'}"
            )
        elif int(owners[0].get("minReplicas", 0)) < 2:
            problems.append(
                f"coordinator: worker group {owners[0].get('groupName')} has minReplicas "
                f"{owners[0].get('minReplicas')}; at least 2 pods so one may fail"
            )
    problems += _check_gcs_ft(rc, coordinator, docs)
    return problems


def _check_gcs_ft(rc: dict[str, Any], coordinator: dict[str, Any] | None, docs: Sequence[Doc]) -> list[str]:
    ft = rc.get("gcsFaultToleranceOptions")
    if not ft:
        return [
            "rayClusterConfig.gcsFaultToleranceOptions: missing; without GCS fault tolerance a head restart "
            "restarts the whole cluster (every replica, every stream)"
        ]
    host, _, port = str(ft.get("redisAddress") or "").rpartition(":")
    if not host:
        return ["gcsFaultToleranceOptions.redisAddress: expected host:port"]
    problems: list[str] = []
    if coordinator is not None:
        cache_url = ((coordinator["args"]["config"].get("cache") or {}).get("url")) or ""
        if f"//{host}:" in cache_url or cache_url.endswith(f"//{host}"):
            problems.append(
                f"gcsFaultToleranceOptions.redisAddress {host!r} is the cache's Redis, which evicts keys "
                "(allkeys-lru): GCS state needs its own Redis with noeviction"
            )
    if "." in host:
        return problems  # outside this release (managed Redis): not ours to inspect
    services = {(d.get("metadata") or {}).get("name"): d for d in docs if d.get("kind") == "Service"}
    svc = services.get(host)
    if svc is None:
        return [*problems, f"gcsFaultToleranceOptions.redisAddress host {host!r} is no Service of this release"]
    selector = (svc.get("spec") or {}).get("selector") or {}
    for d in docs:
        if d.get("kind") != "Deployment":
            continue
        labels = ((d.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {}
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            args = d["spec"]["template"]["spec"]["containers"][0].get("args") or []
            policy = args[args.index("--maxmemory-policy") + 1] if "--maxmemory-policy" in args else "noeviction"
            if policy != "noeviction":
                problems.append(f"{_name(d)}: GCS Redis runs --maxmemory-policy {policy}; it must be noeviction")
    return problems


# ---------------------------------------------------------------------------- disruption budgets


def check_budgets(docs: Sequence[Doc], pods: Sequence[PodTemplate], selects: Selects) -> list[str]:
    problems: list[str] = []
    groups = {
        str(g.get("groupName")): g
        for d in docs
        if d.get("kind") == "RayService"
        for g in _cluster(d).get("workerGroupSpecs") or []
    }
    for d in docs:
        if d.get("kind") != "PodDisruptionBudget":
            continue
        spec = d.get("spec") or {}
        selector = spec.get("selector") or {}
        chosen = [(where, labels) for where, labels, _ in pods if selects(selector, labels)]
        if spec.get("maxUnavailable") in (0, "0", "0%") or "minAvailable" in spec:
            problems.append(
                f"{_name(d)}: blocks drains (maxUnavailable 0 or minAvailable); use maxUnavailable: 1 on a group of ≥ 2 pods"
            )
        for where, labels in chosen:
            if labels.get("ray.io/node-type") == "head":
                problems.append(
                    f"{_name(d)}: selects the head ({where}); a head budget blocks every node drain, and with "
                    "GCS fault tolerance and proxies on every node the head is not worth it"
                )
            group = groups.get(labels.get("ray.io/group", ""))
            if group is not None and int(group.get("minReplicas", 0)) < 2:
                problems.append(
                    f"{_name(d)}: group {group.get('groupName')} may run a single pod (minReplicas "
                    f"{group.get('minReplicas')}): maxUnavailable 1 would let a drain evict its only replica"
                )
    return problems


# ---------------------------------------------------------------------------- hardening


def check_hardening(docs: Sequence[Doc], pods: Sequence[PodTemplate]) -> list[str]:
    problems: list[str] = []
    for d in docs:
        if d.get("kind") == "Namespace":
            level = ((d.get("metadata") or {}).get("labels") or {}).get("pod-security.kubernetes.io/enforce")
            if level != RESTRICTED:
                problems.append(f"{_name(d)}: pod-security.kubernetes.io/enforce is {level!r}, not {RESTRICTED!r}")
    for where, _, spec in pods:
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: securityContext.runAsNonRoot must be true")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: securityContext.seccompProfile.type must be RuntimeDefault")
        for c in spec.get("containers") or []:
            cname = f"{where} container {c.get('name')}"
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cname}: allowPrivilegeEscalation must be false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{cname}: capabilities.drop must include ALL")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cname}: readOnlyRootFilesystem must be true (writable paths are emptyDirs)")
            pre_stop = " ".join(
                map(str, (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or [])
            )
            if "ray stop" in pre_stop:
                problems.append(f"{cname}: preStop runs `ray stop`, which kills open streams; drain the node instead")
    return problems


# ---------------------------------------------------------------------------- TLS front and monitoring


def _grpc_port(docs: Sequence[Doc]) -> int | None:
    for d in docs:
        if d.get("kind") == "RayService":
            port = (_serve_config(d).get("grpc_options") or {}).get("port")
            return int(port) if port is not None else None
    return None


def _rules_for_port(docs: Sequence[Doc], port: int | str) -> list[tuple[Doc, dict[str, Any]]]:
    out = []
    for d in docs:
        if d.get("kind") != "NetworkPolicy":
            continue
        for rule in (d.get("spec") or {}).get("ingress") or []:
            ports = rule.get("ports")
            if ports is None or any(p.get("port") == port for p in ports):
                out.append((d, rule))
    return out


def check_front(docs: Sequence[Doc]) -> list[str]:
    problems: list[str] = []
    port = _grpc_port(docs)
    ingresses = [d for d in docs if d.get("kind") == "Ingress"]
    services = {(d.get("metadata") or {}).get("name"): d for d in docs if d.get("kind") == "Service"}
    for ing in ingresses:
        annotations = (ing.get("metadata") or {}).get("annotations") or {}
        if annotations.get(GRPC_BACKEND_ANNOTATION) != "GRPC":
            problems.append(f"{_name(ing)}: needs {GRPC_BACKEND_ANNOTATION}: GRPC (the proxies speak HTTP/2)")
        spec = ing.get("spec") or {}
        if not any(t.get("secretName") for t in spec.get("tls") or []):
            problems.append(f"{_name(ing)}: spec.tls needs a secretName (the server certificate)")
        for rule in spec.get("rules") or []:
            for path in (rule.get("http") or {}).get("paths") or []:
                svc = ((path.get("backend") or {}).get("service")) or {}
                target = services.get(svc.get("name"))
                ports = [p.get("name") for p in ((target or {}).get("spec") or {}).get("ports") or []]
                if target is None or (svc.get("port") or {}).get("name") not in ports:
                    problems.append(f"{_name(ing)}: backend {svc} is no port of a Service of this release")
    if ingresses and port is not None:
        for policy, rule in _rules_for_port(docs, port):
            peers = rule.get("from")
            if not peers:
                problems.append(f"{_name(policy)}: opens the gRPC port {port} to any source, bypassing the TLS front")
            elif any(
                "ipBlock" in p or not ((p.get("namespaceSelector") or {}).get("matchLabels") or p.get("podSelector"))
                for p in peers
            ):
                problems.append(
                    f"{_name(policy)}: the gRPC port {port} admits peers other than the TLS front's namespace "
                    "(or this release's own pods)"
                )
    for pm in (d for d in docs if d.get("kind") == "PodMonitor"):
        for ep in (pm.get("spec") or {}).get("podMetricsEndpoints") or []:
            if not _rules_for_port_named(docs, ep.get("port")):
                problems.append(f"{_name(pm)}: no NetworkPolicy lets a scraper reach the port {ep.get('port')!r}")
    return problems


def _rules_for_port_named(docs: Sequence[Doc], name: Any) -> bool:
    # Policies name the number; find it among the Ray containers' named ports.
    numbers = {
        p.get("containerPort")
        for d in docs
        if d.get("kind") == "RayService"
        for tmpl in [_cluster(d).get("headGroupSpec") or {}, *(_cluster(d).get("workerGroupSpecs") or [])]
        for c in ((tmpl.get("template") or {}).get("spec") or {}).get("containers") or []
        for p in c.get("ports") or []
        if p.get("name") == name
    }
    # Prometheus lives in another namespace: a rule open to all, or naming a namespace or block.
    return any(
        not rule.get("from") or any("namespaceSelector" in p or "ipBlock" in p for p in rule["from"])
        for n in numbers
        for _, rule in _rules_for_port(docs, n)
    )


def check_pod_monitor(doc: Doc) -> list[str]:
    """The fields of a PodMonitor we use (its CRD is not bundled): strict on those."""
    problems: list[str] = []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r}: expected monitoring.coreos.com/v1")
    meta = doc.get("metadata") or {}
    if not meta.get("name"):
        problems.append("metadata.name: required")
    spec = doc.get("spec") or {}
    unknown = set(spec) - {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    problems += [f"spec.{k}: unexpected field" for k in sorted(unknown)]
    if not (spec.get("selector") or {}).get("matchLabels"):
        problems.append("spec.selector.matchLabels: required (select this release's Ray pods)")
    endpoints = spec.get("podMetricsEndpoints") or []
    if not endpoints:
        problems.append("spec.podMetricsEndpoints: at least one")
    for i, ep in enumerate(endpoints):
        extra = set(ep) - {"port", "path", "interval", "scrapeTimeout", "scheme"}
        problems += [f"spec.podMetricsEndpoints[{i}].{k}: unexpected field" for k in sorted(extra)]
        if not isinstance(ep.get("port"), str):
            problems.append(f"spec.podMetricsEndpoints[{i}].port: a container port name")
    return problems
