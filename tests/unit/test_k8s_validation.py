"""Offline validation of the rendered Kubernetes manifests refuses what a cluster would: unknown
fields in the RayService spec, pod templates, Serve app args and deployment options, core objects,
cross-object mistakes, and a schema directory without the KubeRay CRDs."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_docs import load_docs as _docs
from k8s_docs import one as _one
from k8s_docs import problems as _problems

import eft_serve
from eft_serve.config import load_config
from eft_serve.k8s.validate import BUNDLED_KUBERAY_DIR, CRD_FILES, kuberay_schema_dir

ROOT = Path(__file__).resolve().parents[2]


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
            {"name": "ModelPool", "max_ongoing_request": 4, "ray_actor_options": {"num_gpu": 1}}
        ]
        sc["grpc_options"]["prot"] = 9001

    _edit_serve(docs, edit)
    out = _problems(docs, kuberay_dir)
    assert "applications[0].deployments[0].max_ongoing_request: unknown key 'max_ongoing_request'" in out
    assert "applications[0].deployments[0].ray_actor_options.num_gpu: unknown key" in out
    assert "grpc_options.prot: unknown key" in out


def test_unknown_field_in_a_core_object_is_rejected(kuberay_dir: Path) -> None:
    docs = copy.deepcopy(_docs("overlays/prod"))
    _one(docs, "Deployment", "eft-redis")["spec"]["template"]["spec"]["nodeSelectr"] = {}
    _one(docs, "Service", "eft-grpc")["spec"]["ports"][0]["apProtocol"] = "h2c"
    out = _problems(docs, kuberay_dir)
    assert "Deployment/eft/eft-redis: spec.template.spec" in out and "'nodeSelectr' was unexpected" in out
    assert "Service/eft/eft-grpc: spec.ports[0]" in out and "'apProtocol' was unexpected" in out


def test_cross_object_mistakes_are_rejected(kuberay_dir: Path) -> None:
    docs = copy.deepcopy(_docs("overlays/prod"))
    rc = _rayservice(docs)["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    groups["pool-small-base"]["rayStartParams"].pop("resources")
    groups["pool-large-base"]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")
    rc["headGroupSpec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] = "eft"
    _edit_serve(docs, lambda sc: sc["http_options"].__setitem__("host", "127.0.0.1"))
    out = _problems(docs, kuberay_dir)
    gpus = load_config(ROOT / "deploy/prod.yaml").pools["large_base"].replica.num_gpus
    assert "pool small_base: resource 'pool_small_base' must be advertised by exactly one worker group" in out
    assert f"pool large_base: replicas need {gpus} GPU" in out
    assert "sets ['app.kubernetes.io/name']" in out
    assert "http_options.host: '127.0.0.1' is unreachable" in out


def test_crd_schemas_ship_with_the_package() -> None:
    # Package data (pyproject.toml), with the licence and provenance of the copied files.
    assert kuberay_schema_dir() == BUNDLED_KUBERAY_DIR
    assert BUNDLED_KUBERAY_DIR.is_relative_to(Path(eft_serve.__file__).resolve().parent)
    for name in [*CRD_FILES.values(), "LICENSE", "SOURCE.md"]:
        assert (BUNDLED_KUBERAY_DIR / name).is_file(), name


def test_a_schema_dir_without_the_crds_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "ray.io_rayclusters.yaml").write_text((BUNDLED_KUBERAY_DIR / "ray.io_rayclusters.yaml").read_text())
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{tmp_path} lacks ray.io_rayservices.yaml. The package bundles")
    ):
        kuberay_schema_dir(tmp_path)
    assert kuberay_schema_dir(BUNDLED_KUBERAY_DIR) == BUNDLED_KUBERAY_DIR


# ---------------------------------------------------------------- settings that contradict the config
