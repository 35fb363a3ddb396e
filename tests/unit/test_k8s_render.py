"""k8s/: rendered from the config tree, committed without drift, and valid offline.

Validation needs the KubeRay CRDs from `../shared/schemas/kuberay/` beside the repository; when
they are missing these tests fail (with the path) instead of skipping, so CI cannot go green
without actually checking the RayService.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from eft_serve.config import AutoscalingConfig, ReplicaConfig, demo_config, load_config
from eft_serve.k8s.render import (
    CACHE_PASSWORD_ENV,
    PodSettings,
    StackSettings,
    all_names,
    check_settings,
    drift,
    k8s_serve_config,
    load_settings,
    parse_bytes,
    parse_cpu,
    parse_redis_bytes,
    pod_counts,
    render_named,
    render_stack,
)
from eft_serve.k8s.validate import kuberay_schema_dir, load_target, validate_documents
from eft_serve.serve.app import serve_config

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["base", "overlays/dev", "overlays/prod"]
RERENDER = "re-render with: python -m eft_serve.k8s.render --all"


@pytest.fixture(scope="module")
def kuberay_dir() -> Path:
    try:
        return kuberay_schema_dir(ROOT)
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


def _docs(target: str) -> list[dict[str, Any]]:
    return load_target(ROOT / "k8s" / target)


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def _problems(docs: list[dict[str, Any]], kuberay_dir: Path) -> str:
    return "\n".join(validate_documents(docs, kuberay_dir))


# ---------------------------------------------------------------- generation


def test_settings_cover_base_dev_prod() -> None:
    assert {"base", "dev", "prod"} <= set(all_names(ROOT))


def test_committed_manifests_match_a_fresh_render() -> None:
    problems = [p for name in all_names(ROOT) for p in drift(ROOT, name)]
    assert not problems, "\n".join(problems) + "\n" + RERENDER


def test_render_is_deterministic_across_processes() -> None:
    # Another hash seed reorders sets and dicts built from them; the committed text must not move.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    run = subprocess.run([sys.executable, "-m", "eft_serve.k8s.render", "--all", "--check", "--root", str(ROOT)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert render_named(ROOT, "prod") == render_named(ROOT, "prod")


def test_serve_config_v2_is_generated_from_the_config_tree() -> None:
    for name in all_names(ROOT):
        settings = load_settings(ROOT, name)
        if not isinstance(settings, StackSettings):
            continue
        cfg = load_config(ROOT / settings.config)
        rs = _one(_docs("base" if name == "base" else f"overlays/{name}"), "RayService")
        embedded = yaml.safe_load(rs["spec"]["serveConfigV2"])
        assert embedded == k8s_serve_config(cfg)
        # The only difference from the local Serve config: the proxy listens on the pod IP.
        local = serve_config(cfg)
        local["http_options"]["host"] = "0.0.0.0"
        assert embedded == local


def test_k8s_configs_pin_every_pool_to_its_node_group() -> None:
    for path in ("deploy/k8s-dev.yaml", "deploy/prod.yaml"):
        cfg = load_config(ROOT / path)
        assert {r: p.replica.node_group_resource for r, p in cfg.pools.items()} == {
            r: f"pool_{r}" for r in cfg.pools}, path
        assert cfg.coordinator.replica.node_group_resource == "eft_head"
        assert cfg.cache.password_env == CACHE_PASSWORD_ENV and cfg.cache.password is None


# ---------------------------------------------------------------- validation passes


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_manifests_validate(target: str, kuberay_dir: Path) -> None:
    docs = _docs(target)
    assert docs
    assert _problems(docs, kuberay_dir) == ""


def test_dev_overlay_is_the_base_in_its_own_namespace() -> None:
    docs = _docs("overlays/dev")
    kinds = sorted(d["kind"] for d in docs)
    assert {"RayService", "Secret", "Namespace", "Deployment", "NetworkPolicy", "PodDisruptionBudget"} <= set(kinds)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"eft-dev"}
    base = _one(_docs("base"), "RayService")
    assert "namespace" not in base["metadata"]
    assert _one(docs, "RayService")["spec"] == base["spec"]


# ---------------------------------------------------------------- what the manifests say


def test_prod_worker_groups_follow_the_pools() -> None:
    docs = _docs("overlays/prod")
    cfg = load_config(ROOT / "deploy/prod.yaml")
    rc = _one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True and rc["autoscalerOptions"]["idleTimeoutSeconds"] == 600
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    assert set(groups) == {"pool-large-base", "pool-small-base", "pool-small-ft"}
    for role, pool in cfg.pools.items():
        g = groups["pool-" + role.replace("_", "-")]
        assert g["rayStartParams"]["resources"] == f"'{{\"pool_{role}\":1000}}'"
        container = g["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert g["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert g["template"]["spec"]["nodeSelector"]["eft-serve.io/node-pool"].startswith("gpu")
        a = pool.replica.autoscaling
        assert (g["minReplicas"], g["maxReplicas"]) == (a.min_replicas, a.max_replicas)  # one replica per pod
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
        # Our readiness probe replaces KubeRay's, which would wait for a proxy workers never run.
        assert container["readinessProbe"]["httpGet"]["path"] == "/api/healthz"
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["resources"] == "'{\"eft_head\":1000}'"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    labels = head["template"]["metadata"]["labels"]
    assert "app.kubernetes.io/name" not in labels  # KubeRay's head Service selects on its own value


def test_services_policies_budgets_and_redis() -> None:
    docs = _docs("overlays/prod")
    grpc = _one(docs, "Service", "eft-grpc")
    assert grpc["spec"]["ports"] == [{"name": "grpc", "port": 9000, "targetPort": "grpc", "protocol": "TCP",
                                      "appProtocol": "kubernetes.io/h2c"}]
    assert grpc["spec"]["selector"]["app.kubernetes.io/component"] == "ray-head"
    redis_svc = _one(docs, "Service", "eft-redis")
    assert redis_svc["spec"]["type"] == "ClusterIP"
    redis = _one(docs, "Deployment", "eft-redis")["spec"]["template"]["spec"]["containers"][0]
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--maxmemory") + 1] == "4gb"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert redis["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "eft-redis", "key": "password"}
    assert not [d for d in docs if d["kind"] == "Secret"], "prod must not commit a password"
    head = _one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    secret_ref = {"secretKeyRef": {"name": "eft-redis", "key": "password"}}
    assert {"name": CACHE_PASSWORD_ENV, "valueFrom": secret_ref} in head["containers"][0]["env"]

    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"eft-ray-internal", "eft-grpc-clients", "eft-kuberay-operator", "eft-redis"}
    assert policies["eft-grpc-clients"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 9000}]
    assert policies["eft-grpc-clients"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "eft-serve.io/grpc-client": "true"}
    assert policies["eft-redis"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 6379}]
    assert {p["port"] for p in policies["eft-kuberay-operator"]["ingress"][0]["ports"]} == {8265, 8000}
    assert "ports" not in policies["eft-ray-internal"]["ingress"][0]  # Ray picks worker ports at random

    budgets = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert budgets["eft-head"]["maxUnavailable"] == 0
    assert {budgets[f"eft-pool-{g}"]["maxUnavailable"] for g in ("large-base", "small-base", "small-ft")} == {1}


def test_dev_overlay_uses_demo_models_on_cpu() -> None:
    rc = _one(_docs("overlays/dev"), "RayService")["spec"]["rayClusterConfig"]
    serve = yaml.safe_load(_one(_docs("overlays/dev"), "RayService")["spec"]["serveConfigV2"])
    pools = [a["args"]["pool"] for a in serve["applications"] if "pool" in a["args"]]
    assert {p["model"] for p in pools} == {"demo:large_base", "demo:small_base", "demo:small_ft"}
    for g in rc["workerGroupSpecs"]:
        assert "nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert g["rayStartParams"]["num-gpus"] == "0"


# ---------------------------------------------------------------- broken manifests are rejected


def _rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(docs, "RayService")


def _edit_serve(docs: list[dict[str, Any]], edit: Any) -> None:
    rs = _rayservice(docs)
    sc = yaml.safe_load(rs["spec"]["serveConfigV2"])
    edit(sc)
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(sc)


def test_unknown_field_in_rayservice_spec_is_rejected(kuberay_dir: Path) -> None:
    docs = copy.deepcopy(_docs("overlays/prod"))
    _rayservice(docs)["spec"]["serveConfigV3"] = "typo"
    _rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    out = _problems(docs, kuberay_dir)
    assert "'serveConfigV3' was unexpected" in out
    assert "spec.rayClusterConfig.workerGroupSpecs[0]" in out and "'minReplica' was unexpected" in out


def test_unknown_field_in_a_pod_template_is_rejected(kuberay_dir: Path) -> None:
    docs = copy.deepcopy(_docs("overlays/prod"))
    head = _rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["resource"] = {}
    out = _problems(docs, kuberay_dir)
    assert "headGroupSpec.template.spec.containers[0]" in out and "'resource' was unexpected" in out


def test_unknown_key_in_serve_app_args_is_rejected(kuberay_dir: Path) -> None:
    docs = copy.deepcopy(_docs("overlays/prod"))

    def edit(sc: dict[str, Any]) -> None:
        sc["applications"][0]["args"]["pool"]["kv_cache_byte"] = 1
        sc["applications"][-1]["args"]["config"]["coordinatr"] = {}
        sc["applications"][-1]["args"]["extra"] = True

    _edit_serve(docs, edit)
    out = _problems(docs, kuberay_dir)
    assert "spec.serveConfigV2: applications[0].args.pool.kv_cache_byte" in out
    assert "applications[3].args.config.coordinatr" in out
    assert "applications[3].args.extra: unknown key 'extra'" in out


def test_typo_in_a_serve_deployment_option_is_rejected(kuberay_dir: Path) -> None:
    docs = copy.deepcopy(_docs("overlays/dev"))

    def edit(sc: dict[str, Any]) -> None:
        sc["applications"][0]["deployments"] = [
            {"name": "ModelPool", "max_ongoing_request": 4, "ray_actor_options": {"num_gpu": 1}}]
        sc["grpc_options"]["prot"] = 9001

    _edit_serve(docs, edit)
    out = _problems(docs, kuberay_dir)
    assert "applications[0].deployments[0].max_ongoing_request: unknown key 'max_ongoing_request'" in out
    assert "applications[0].deployments[0].ray_actor_options.num_gpu: unknown key" in out
    assert "grpc_options.prot: unknown key" in out


def test_unknown_field_in_a_core_object_is_rejected(kuberay_dir: Path) -> None:
    docs = copy.deepcopy(_docs("overlays/prod"))
    _one(docs, "Deployment")["spec"]["template"]["spec"]["nodeSelectr"] = {}
    _one(docs, "Service", "eft-grpc")["spec"]["ports"][0]["apProtocol"] = "h2c"
    out = _problems(docs, kuberay_dir)
    assert "Deployment/eft/eft-redis: spec.template.spec" in out and "'nodeSelectr' was unexpected" in out
    assert "Service/eft/eft-grpc: spec.ports[0]" in out and "'apProtocol' was unexpected" in out


def test_cross_object_mistakes_are_rejected(kuberay_dir: Path) -> None:
    docs = copy.deepcopy(_docs("overlays/prod"))
    rc = _rayservice(docs)["spec"]["rayClusterConfig"]
    rc["workerGroupSpecs"][1]["rayStartParams"].pop("resources")
    rc["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")
    rc["headGroupSpec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] = "eft"
    _edit_serve(docs, lambda sc: sc["http_options"].__setitem__("host", "127.0.0.1"))
    out = _problems(docs, kuberay_dir)
    assert "pool small_base: resource 'pool_small_base' must be advertised by exactly one worker group" in out
    assert "pool large_base: replicas need 1.0 GPU" in out
    assert "sets ['app.kubernetes.io/name']" in out
    assert "http_options.host: '127.0.0.1' is unreachable" in out


def test_missing_crd_schemas_fail_clearly(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(FileNotFoundError, match=r"shared/schemas/kuberay.*ray.io_rayservices.yaml"):
        kuberay_schema_dir(repo)


# ---------------------------------------------------------------- settings that contradict the config


def _base_settings() -> StackSettings:
    s = load_settings(ROOT, "base")
    assert isinstance(s, StackSettings)
    return s


def test_pools_without_node_group_resource_are_refused() -> None:
    cfg = demo_config()  # local config: no node groups, no cluster Redis
    with pytest.raises(ValueError, match=r"pools\.large_base\.replica\.node_group_resource: required"):
        render_stack(cfg, _base_settings(), "demo")


def test_gpu_models_need_gpu_pods_and_the_rendered_redis() -> None:
    cfg = load_config(ROOT / "deploy/prod.yaml")
    s = load_settings(ROOT, "prod")
    assert isinstance(s, StackSettings)
    check_settings(cfg, s)
    no_gpu = s.model_copy(update={"pools": {**s.pools, "small_ft": PodSettings(cpu="8", memory="48Gi")}})
    with pytest.raises(ValueError, match=r"pools\.small_ft: replicas need 1\.0 GPU but the pod has none"):
        check_settings(cfg, no_gpu)
    elsewhere = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"url": "redis://other:6379/0"})})
    with pytest.raises(ValueError, match=r"cache\.url 'redis://other:6379/0' must point at the rendered Redis"):
        check_settings(elsewhere, s)
    no_volume = s.model_copy(update={"model_volume": None})
    with pytest.raises(ValueError, match=r"pools\.large_base\.model '/models/Llama-2-70b-hf' is not under"):
        check_settings(cfg, no_volume)


def test_unknown_settings_keys_are_errors() -> None:
    data = yaml.safe_load((ROOT / "k8s/settings/prod.yaml").read_text())
    data["head"]["gpu"] = 1
    with pytest.raises(ValueError, match="gpu"):
        StackSettings.model_validate(data)


# ---------------------------------------------------------------- arithmetic


def test_quantities() -> None:
    assert parse_cpu("1500m") == 1.5 and parse_cpu("8") == 8
    assert parse_bytes("4Gi") == 4 * 2**30 and parse_bytes("512M") == 512 * 10**6
    assert parse_redis_bytes("256mb") == 256 * 2**20 and parse_redis_bytes("1g") == 10**9
    with pytest.raises(ValueError):
        parse_redis_bytes("4 GiB")


def test_pod_counts_follow_replica_packing() -> None:
    pod = PodSettings(cpu="8", memory="64Gi", gpus=2)
    auto = ReplicaConfig(num_cpus=2, num_gpus=1, max_ongoing_requests=16,
                         autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=5, target_ongoing_requests=4))
    assert pod_counts(auto, pod) == (1, 1, 3)  # two replicas per pod (GPU-bound)
    fixed = ReplicaConfig(num_cpus=3, num_replicas=5)
    assert pod_counts(fixed, PodSettings(cpu="8", memory="8Gi")) == (3, 3, 3)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_kustomize_reader_matches_kubectl(overlay: str) -> None:
    # validate.load_kustomization emulates `resources` + `namespace`; hold it to the real thing.
    import shutil

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (the comparison is optional; validation does not need it)")
    built = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    ours = sorted(_docs(f"overlays/{overlay}"), key=key)
    theirs = sorted((d for d in yaml.safe_load_all(built.stdout) if d), key=key)
    assert ours == theirs
