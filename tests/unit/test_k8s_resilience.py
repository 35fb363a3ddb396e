"""k8s/: no single point of failure, hardened pods, a TLS front — rendered so, and the validator
rejects each way of breaking it (every mistake below is made on a copy of the committed output
and must be named by `validate_documents`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from eft_serve.config import load_config
from eft_serve.k8s.checks import check_settings
from eft_serve.k8s.files import load_settings
from eft_serve.k8s.settings import PodSettings, StackSettings
from eft_serve.k8s.validate import kuberay_schema_dir, load_target, validate_documents

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kuberay_dir() -> Path:
    return kuberay_schema_dir()


def _docs(target: str = "overlays/prod") -> list[dict[str, Any]]:
    return copy.deepcopy(load_target(ROOT / "k8s" / target))


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _rc(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(docs, "RayService")["spec"]["rayClusterConfig"]


def _group(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(g for g in _rc(docs)["workerGroupSpecs"] if g["groupName"] == name)


def _problems(docs: list[dict[str, Any]], kuberay_dir: Path) -> str:
    return "\n".join(validate_documents(docs, kuberay_dir))


def _edit_serve(docs: list[dict[str, Any]], edit: Any) -> None:
    rs = _one(docs, "RayService")
    sc = yaml.safe_load(rs["spec"]["serveConfigV2"])
    edit(sc)
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(sc)


# ---------------------------------------------------------------- what is rendered


@pytest.mark.parametrize("target", ["base", "overlays/prod"])
def test_rendered_release_has_no_single_point(target: str) -> None:
    docs = _docs(target)
    rc = _rc(docs)
    serve = yaml.safe_load(_one(docs, "RayService")["spec"]["serveConfigV2"])
    assert serve["proxy_location"] == "EveryNode"
    coordinator = serve["applications"][-1]["args"]["config"]["coordinator"]["replica"]
    least = (coordinator["autoscaling"] or {}).get("min_replicas") or coordinator["num_replicas"]
    assert least >= 2 and coordinator["node_group_resource"] == "eft_coordinator"
    # Nothing lands on the head; the coordinators have a group of their own, two pods at least.
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert "resources" not in rc["headGroupSpec"]["rayStartParams"]
    group = _group(docs, "coordinator")
    assert group["minReplicas"] >= 2 and "eft_coordinator" in group["rayStartParams"]["resources"]
    # GCS fault tolerance in a Redis of its own that never evicts.
    ft = rc["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "eft-gcs-redis:6379"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "eft-redis", "key": "password"}
    args = _one(docs, "Deployment", "eft-gcs-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction" and "--appendonly" in args
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget" and "head" in d["metadata"]["name"]]


def test_ray_pods_are_restricted_read_only_and_drain_on_stop() -> None:
    docs = _docs()
    rc = _rc(docs)
    for tmpl in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]:
        spec = tmpl["template"]["spec"]
        c = spec["containers"][0]
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/tmp"] == "tmp" and mounts["/home/ray/.cache"] == "cache"
        assert {"name": "tmp", "emptyDir": {}} in spec["volumes"]
        command = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
        assert "ray stop" not in command
    worker = _group(docs, "pool-large-base")["template"]["spec"]
    command = worker["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "ray drain-node" in command and "--deadline-remaining-seconds 120" in command and "sleep 120" in command
    # The grace period covers the drain and the replicas' own graceful shutdown.
    assert worker["terminationGracePeriodSeconds"] >= 120 + 30
    ns = _one(docs, "Namespace")["metadata"]["labels"]
    assert {ns[f"pod-security.kubernetes.io/{m}"] for m in ("enforce", "audit", "warn")} == {"restricted"}


def test_tls_ingress_and_pod_monitor() -> None:
    docs = _docs()
    ing = _one(docs, "Ingress")
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    # Tied to the request timeout (prod: default_timeout_s) plus slack, so the server answers first.
    cfg = load_config(ROOT / "deploy/prod.yaml")
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) == int(cfg.coordinator.default_timeout_s) + 10
    assert ann["nginx.ingress.kubernetes.io/proxy-body-size"] == "4m"
    assert ing["spec"]["tls"] == [{"hosts": ["eft.example.com"], "secretName": "eft-grpc-tls"}]
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend == {"service": {"name": "eft-grpc", "port": {"name": "grpc"}}}
    pm = _one(docs, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    for tmpl in [_rc(docs)["headGroupSpec"], *_rc(docs)["workerGroupSpecs"]]:
        ports = {p["name"]: p["containerPort"] for p in tmpl["template"]["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 8080 and ports["grpc"] == 9000  # every pod runs a proxy and exports metrics


# ---------------------------------------------------------------- the validator rejects each mistake


def test_head_only_proxy_is_rejected(kuberay_dir: Path) -> None:
    docs = _docs()
    _edit_serve(docs, lambda sc: sc.__setitem__("proxy_location", "HeadOnly"))
    assert "proxy_location is 'HeadOnly'" in _problems(docs, kuberay_dir)


def test_coordinators_on_the_head_or_alone_are_rejected(kuberay_dir: Path) -> None:
    docs = _docs()
    rc = _rc(docs)
    rc["headGroupSpec"]["rayStartParams"]["resources"] = "'{\"eft_coordinator\":1000}'"
    _group(docs, "coordinator")["minReplicas"] = 1

    def one_coordinator(sc: dict[str, Any]) -> None:
        replica = sc["applications"][-1]["args"]["config"]["coordinator"]["replica"]
        replica["autoscaling"]["min_replicas"] = 1

    _edit_serve(docs, one_coordinator)
    out = _problems(docs, kuberay_dir)
    assert "coordinator: resource 'eft_coordinator' is advertised by the head" in out
    assert "coordinator: worker group coordinator has minReplicas 1" in out
    assert "coordinator: at least 2 replicas needed, the config allows 1" in out


def test_missing_or_evicting_gcs_fault_tolerance_is_rejected(kuberay_dir: Path) -> None:
    docs = _docs()
    _rc(docs).pop("gcsFaultToleranceOptions")
    assert "gcsFaultToleranceOptions: missing" in _problems(docs, kuberay_dir)
    docs = _docs()
    _rc(docs)["gcsFaultToleranceOptions"]["redisAddress"] = "eft-redis:6379"  # the cache's
    assert "is the cache's Redis, which evicts keys" in _problems(docs, kuberay_dir)
    docs = _docs()
    args = _one(docs, "Deployment", "eft-gcs-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    args[args.index("--maxmemory-policy") + 1] = "allkeys-lru"
    assert "GCS Redis runs --maxmemory-policy allkeys-lru" in _problems(docs, kuberay_dir)


def _pdb(name: str, labels: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": "eft"},
        "spec": {"selector": {"matchLabels": labels}, **spec},
    }


def test_budgets_on_the_head_blocking_drains_or_on_a_lone_pod_are_rejected(kuberay_dir: Path) -> None:
    docs = _docs()
    head = {"app.kubernetes.io/instance": "eft", "app.kubernetes.io/component": "ray-head"}
    pool = {"app.kubernetes.io/instance": "eft", "eft-serve.io/pool": "large_base"}
    docs += [
        _pdb("head", head, maxUnavailable=1),
        _pdb("pool", pool, maxUnavailable=1),
        _pdb("frozen", {"eft-serve.io/group": "coordinator"}, maxUnavailable=0),
    ]
    out = _problems(docs, kuberay_dir)
    assert "PodDisruptionBudget/eft/head: selects the head" in out
    assert "PodDisruptionBudget/eft/pool: group pool-large-base may run a single pod (minReplicas 1)" in out
    assert "PodDisruptionBudget/eft/frozen: blocks drains" in out


def test_pods_that_are_not_hardened_are_rejected(kuberay_dir: Path) -> None:
    docs = _docs()
    rc = _rc(docs)
    head = rc["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["securityContext"].pop("readOnlyRootFilesystem")
    worker = _group(docs, "pool-small-ft")["template"]["spec"]
    worker["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] = ["/bin/sh", "-c", "ray stop"]
    worker["securityContext"].pop("seccompProfile")
    redis = _one(docs, "Deployment", "eft-redis")["spec"]["template"]["spec"]["containers"][0]
    redis["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    _one(docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = "baseline"
    out = _problems(docs, kuberay_dir)
    assert "RayService/eft/eft head container ray-head: readOnlyRootFilesystem must be true" in out
    assert "group pool-small-ft container ray-worker: preStop runs `ray stop`" in out
    assert "group pool-small-ft: securityContext.seccompProfile.type must be RuntimeDefault" in out
    assert "Deployment/eft/eft-redis pod container redis: capabilities.drop must include ALL" in out
    assert "Namespace/eft: pod-security.kubernetes.io/enforce is 'baseline', not 'restricted'" in out


def test_a_front_that_can_be_bypassed_or_does_not_speak_grpc_is_rejected(kuberay_dir: Path) -> None:
    docs = _docs()
    _one(docs, "NetworkPolicy", "eft-grpc-clients")["spec"]["ingress"][0].pop("from")
    ing = _one(docs, "Ingress")
    ing["metadata"]["annotations"].pop("nginx.ingress.kubernetes.io/backend-protocol")
    ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] = {"name": "http"}
    docs.remove(_one(docs, "NetworkPolicy", "eft-metrics"))
    _one(docs, "PodMonitor")["spec"]["podMetricEndpoints"] = []
    out = _problems(docs, kuberay_dir)
    assert "NetworkPolicy/eft/eft-grpc-clients: opens the gRPC port 9000 to any source, bypassing the TLS front" in out
    assert "Ingress/eft/eft-grpc: needs nginx.ingress.kubernetes.io/backend-protocol: GRPC" in out
    assert "Ingress/eft/eft-grpc: backend" in out and "is no port of a Service" in out
    assert "PodMonitor/eft/eft-ray: no NetworkPolicy lets a scraper reach the port 'metrics'" in out
    assert "PodMonitor/eft/eft-ray: spec.podMetricEndpoints: unexpected field" in out


# ---------------------------------------------------------------- settings that would make a single point


def test_settings_with_a_lone_or_shared_coordinator_are_refused() -> None:
    cfg = load_config(ROOT / "deploy/prod.yaml")
    s = load_settings(ROOT, "prod")
    assert isinstance(s, StackSettings)
    check_settings(cfg, s)
    auto = cfg.coordinator.replica.autoscaling
    assert auto is not None
    lone = cfg.model_copy(deep=True)
    assert lone.coordinator.replica.autoscaling is not None
    lone.coordinator.replica.autoscaling.min_replicas = 1
    with pytest.raises(ValueError, match="coordinator: at least 2 replicas"):
        check_settings(lone, s)
    packed = s.model_copy(update={"coordinator": PodSettings(cpu="4", memory="8Gi")})
    with pytest.raises(ValueError, match="coordinator: 4 replicas fit one coordinator pod"):
        check_settings(cfg, packed)
    unpinned = cfg.model_copy(deep=True)
    unpinned.coordinator.replica.node_group_resource = None
    with pytest.raises(ValueError, match="coordinator.replica.node_group_resource: required"):
        check_settings(unpinned, s)
    data = yaml.safe_load((ROOT / "k8s/settings/prod.yaml").read_text())
    data["network"]["grpc_clients"] = [{"namespaceSelector": {}}]
    with pytest.raises(ValueError, match="only the ingress controller reaches the gRPC port"):
        StackSettings.model_validate(data)


def test_config_secrets_reach_only_the_coordinators_from_the_app_secret() -> None:
    from eft_serve.config import EftConfig
    from eft_serve.k8s.stack import render_stack

    data = load_config(ROOT / "deploy" / "k8s-dev.yaml").model_dump(mode="json")
    data["auth"] = {"enabled": True, "keys_env": "EFT_API_KEYS"}
    data["cache"]["hmac_key_env"] = "EFT_CACHE_HMAC_KEY"
    cfg = EftConfig.model_validate(data)
    settings = load_settings(ROOT, "base")
    assert isinstance(settings, StackSettings)
    docs = render_stack(cfg, settings, "test")
    groups = {g["groupName"]: g for g in _rc(docs)["workerGroupSpecs"]}
    secret = settings.app_secret()

    def secret_env(group: dict[str, Any]) -> dict[str, Any]:
        env = group["template"]["spec"]["containers"][0].get("env", [])
        return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}

    coordinator = next(g for name, g in groups.items() if "coordinator" in name)
    refs = secret_env(coordinator)
    assert refs["EFT_API_KEYS"] == {"name": secret, "key": "EFT_API_KEYS"}
    assert refs["EFT_CACHE_HMAC_KEY"] == {"name": secret, "key": "EFT_CACHE_HMAC_KEY"}
    for name, group in groups.items():
        if group is not coordinator:
            assert not {"EFT_API_KEYS", "EFT_CACHE_HMAC_KEY"} & set(secret_env(group)), name
