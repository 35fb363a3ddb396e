"""Cross-object checks of one rendered release: facts that no single object's schema can see.

Owns the checks that span objects: selectors that select a pod the release creates, every pod
isolated by a NetworkPolicy, KubeRay's own labels left alone; per RayService, every pool's Serve
application and node-group resource advertised by exactly one worker group that fits its replicas
(GPUs, CPUs), the gRPC port wired from Serve to the head container and a Service, the cache url
pointing at a rendered Service and its password env where the coordinator may run; and, through
`resilience_checks`, no single point of failure, hardening and the front door. Knows nothing of
schemas (`validate`) or of how manifests are rendered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import yaml

from eft_serve.k8s.resilience_checks import check_budgets, check_front, check_hardening, check_no_single_points
from eft_serve.serve.names import pool_app_name

# KubeRay selects its head Service endpoints on these; a pod template must not override them.
KUBERAY_OWNED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/created-by")


def object_name(doc: dict[str, Any]) -> str:
    """`Kind/namespace/name` of an object, as every problem message names it."""
    meta = doc.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{doc.get('kind', '?')}/{ns}{meta.get('name', '?')}"


def _pod_templates(docs: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, labels as they will be at run time, pod spec) of every pod the objects create."""
    out = []
    for d in docs:
        spec = d.get("spec") or {}
        if d.get("kind") == "Deployment":
            t = spec.get("template") or {}
            out.append(
                (f"{object_name(d)} pod", dict((t.get("metadata") or {}).get("labels") or {}), t.get("spec") or {})
            )
        elif d.get("kind") == "RayService":
            rc = spec.get("rayClusterConfig") or {}
            head = (rc.get("headGroupSpec") or {}).get("template") or {}
            # KubeRay adds these; the ray.io/serve value flips with the proxy's health.
            extra = {"ray.io/node-type": "head", "ray.io/serve": "true"}
            out.append(
                (
                    f"{object_name(d)} head",
                    {**((head.get("metadata") or {}).get("labels") or {}), **extra},
                    head.get("spec") or {},
                )
            )
            for g in rc.get("workerGroupSpecs") or []:
                t = g.get("template") or {}
                # KubeRay sets ray.io/serve=true on a RayService's workers (readiness gates traffic).
                labels = {
                    **((t.get("metadata") or {}).get("labels") or {}),
                    "ray.io/node-type": "worker",
                    "ray.io/group": str(g.get("groupName")),
                    "ray.io/serve": "true",
                }
                out.append((f"{object_name(d)} group {g.get('groupName')}", labels, t.get("spec") or {}))
    return out


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        present = key in labels
        if (
            (op == "In" and (not present or labels[key] not in values))
            or (op == "NotIn" and present and labels[key] in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def _ray_start_resources(group: dict[str, Any]) -> dict[str, float]:
    raw = (group.get("rayStartParams") or {}).get("resources")
    if not raw:
        return {}
    try:
        return json.loads(str(raw).strip("'\"` "))
    except ValueError:
        return {}


def check_release(docs: Sequence[dict[str, Any]]) -> list[str]:
    """Facts that span objects; `docs` is everything one environment applies."""
    problems: list[str] = []
    pods = _pod_templates(docs)
    for where, labels, _ in pods:
        if " head" in where or " group " in where:
            owned = [k for k in KUBERAY_OWNED_LABELS if k in labels]
            if owned:
                problems.append(f"{where}: sets {owned}, which KubeRay's head Service selects on")
    for d in docs:
        kind, spec = d.get("kind"), d.get("spec") or {}
        selector = None
        if kind == "Service":
            selector = {"matchLabels": spec.get("selector") or {}}
        elif kind in ("PodDisruptionBudget", "Deployment"):
            selector = spec.get("selector") or {}
        elif kind == "NetworkPolicy":
            selector = spec.get("podSelector") or {}
        if selector is not None and not any(_selects(selector, labels) for _, labels, _ in pods):
            problems.append(f"{object_name(d)}: its selector matches no pod this release creates")
    isolated = [
        d for d in docs if d.get("kind") == "NetworkPolicy" and "Ingress" in (d["spec"].get("policyTypes") or [])
    ]
    for where, labels, _ in pods:
        if not any(_selects(p["spec"].get("podSelector") or {}, labels) for p in isolated):
            problems.append(f"{where}: no NetworkPolicy restricts its ingress")
    for d in docs:
        if d.get("kind") == "RayService":
            problems += [f"{object_name(d)}: {p}" for p in _check_rayservice(d, docs)]
            problems += [f"{object_name(d)}: {p}" for p in check_no_single_points(d, docs)]
    problems += check_budgets(docs, pods, _selects)
    problems += check_hardening(docs, pods)
    problems += check_front(docs)
    return problems


def _check_rayservice(rs: dict[str, Any], docs: Sequence[dict[str, Any]]) -> list[str]:
    spec = rs.get("spec") or {}
    try:
        serve = yaml.safe_load(spec.get("serveConfigV2") or "") or {}
    except yaml.YAMLError:
        return []  # reported by the schema check
    rc = spec.get("rayClusterConfig") or {}
    head = rc.get("headGroupSpec") or {}
    groups = rc.get("workerGroupSpecs") or []
    apps = {a.get("name"): a for a in serve.get("applications") or [] if isinstance(a, dict)}
    coordinator = next((a for a in apps.values() if "config" in (a.get("args") or {})), None)
    if coordinator is None:
        return []
    cfg = coordinator["args"]["config"]
    problems: list[str] = []
    advertised = {g.get("groupName"): _ray_start_resources(g) for g in groups}
    for role, pool in (cfg.get("pools") or {}).items():
        if pool.get("colocate_with"):
            continue  # a co-located LoRA role: no Serve application or worker group, it rides in its base's
        replica = pool.get("replica") or {}
        res = replica.get("node_group_resource")
        if pool_app_name(role) not in apps:
            problems.append(f"pool {role}: no Serve application {pool_app_name(role)!r}")
        if not res:
            problems.append(f"pool {role}: replica.node_group_resource is unset; its replicas may land on any node")
            continue
        owners = [g for g, r in advertised.items() if res in r]
        if len(owners) != 1:
            problems.append(
                f"pool {role}: resource {res!r} must be advertised by exactly one worker group, "
                f"found {owners or 'none'}"
            )
            continue
        group = next(g for g in groups if g.get("groupName") == owners[0])
        problems += _check_group_fits(role, replica, group)
    coord_res = ((cfg.get("coordinator") or {}).get("replica") or {}).get("node_group_resource")
    problems += _check_grpc(serve, head, docs)
    problems += _check_cache(cfg, head, groups, coord_res, docs)
    return problems


def _check_group_fits(role: str, replica: dict[str, Any], group: dict[str, Any]) -> list[str]:
    name = group.get("groupName")
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    gpus = sum(int(v) for k, v in limits.items() if k.endswith("/gpu"))
    problems = []
    if float(replica.get("num_gpus") or 0) > gpus:
        problems.append(f"pool {role}: replicas need {replica.get('num_gpus')} GPU, group {name} pods have {gpus}")
    ray_cpus = (group.get("rayStartParams") or {}).get("num-cpus")
    if ray_cpus is not None and float(replica.get("num_cpus") or 0) > float(ray_cpus):
        problems.append(f"pool {role}: replicas need {replica.get('num_cpus')} CPU, group {name} offers {ray_cpus}")
    if int(group.get("maxReplicas", 0)) < 1:
        problems.append(f"pool {role}: group {name} has maxReplicas < 1")
    return problems


def _check_grpc(serve: dict[str, Any], head: dict[str, Any], docs: Sequence[dict[str, Any]]) -> list[str]:
    port = (serve.get("grpc_options") or {}).get("port")
    containers = ((head.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    named = {p.get("name"): p.get("containerPort") for p in containers[0].get("ports") or []}
    problems = []
    if named.get("grpc") != port:
        problems.append(f"head container port 'grpc' is {named.get('grpc')}, Serve's gRPC port is {port}")
    services = [
        d
        for d in docs
        if d.get("kind") == "Service" and any(p.get("name") == "grpc" for p in (d.get("spec") or {}).get("ports") or [])
    ]
    if not services:
        problems.append("no Service exposes a port named 'grpc'")
    for svc in services:
        for p in svc["spec"]["ports"]:
            if p.get("name") == "grpc" and p.get("targetPort") not in ("grpc", port):
                problems.append(
                    f"{object_name(svc)}: port grpc targets {p.get('targetPort')}, not the gRPC port {port}"
                )
    return problems


def _env_names(spec: dict[str, Any]) -> set[str]:
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return {e.get("name") for e in containers[0].get("env") or []}


def _check_cache(
    cfg: dict[str, Any],
    head: dict[str, Any],
    groups: list[dict[str, Any]],
    coord_res: str | None,
    docs: Sequence[dict[str, Any]],
) -> list[str]:
    cache = cfg.get("cache") or {}
    if not cache.get("enabled", True) or not cache.get("url"):
        return []
    problems = []
    url = urlparse(cache["url"])
    services = {(d.get("metadata") or {}).get("name"): d for d in docs if d.get("kind") == "Service"}
    # A dotted host is outside this release (managed Redis): not ours to find.
    if url.hostname and "." not in url.hostname:
        svc = services.get(url.hostname)
        if svc is None:
            problems.append(f"cache.url host {url.hostname!r} is no Service of this release")
        elif (url.port or 6379) not in [p.get("port") for p in svc["spec"].get("ports") or []]:
            problems.append(f"cache.url port {url.port or 6379} is not a port of Service {url.hostname!r}")
    env = cache.get("password_env")
    if env:
        # The coordinator runs where its resource is advertised, or anywhere when unpinned.
        everywhere = [("head", head)] + [(g.get("groupName"), g) for g in groups]
        pinned = [(w, spec) for w, spec in everywhere if coord_res and coord_res in _ray_start_resources(spec)]
        hosts = pinned if coord_res else everywhere
        for where, spec in hosts:
            if env not in _env_names(spec):
                problems.append(
                    f"cache.password_env {env!r} is not set in the {where} pods, which may run the coordinator"
                )
    return problems
