"""Tensor-parallel vLLM pools: config rules, the Serve placement options per replica, k8s sizing.

No GPUs needed: these check the options handed to Serve (and that Serve accepts them) and the
pod arithmetic, not a running multi-GPU replica.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from eft_serve.config import EftConfig, PoolConfig, load_config
from eft_serve.k8s.settings import PodSettings, StackSettings, parse_settings
from eft_serve.k8s.sizing import pod_counts, replicas_per_pod, with_derived_gpus
from eft_serve.k8s.stack import render_stack
from eft_serve.serve.app import pool_deployment_options
from eft_serve.serve.tensor_parallel import STRATEGY, apply_tensor_parallel

ROOT = Path(__file__).resolve().parents[2]


def _pool(tp: int, engine: str = "vllm", **replica) -> PoolConfig:
    return PoolConfig.model_validate(
        {
            "model": "/models/m",
            "engine": engine,
            "vllm": {"tensor_parallel_size": tp},
            "replica": {"num_cpus": 4, "num_gpus": tp, "node_group_resource": "pool_x", **replica},
        }
    )


def test_single_gpu_pools_keep_plain_actor_options() -> None:
    for pool in (_pool(1), _pool(1, engine="hf")):
        opts = pool_deployment_options(pool)
        assert "placement_group_bundles" not in opts
        assert opts["ray_actor_options"]["num_gpus"] == 1


def test_tensor_parallel_replica_gets_a_packed_placement_group() -> None:
    opts = pool_deployment_options(_pool(4, memory_bytes=2**30))
    bundles = opts["placement_group_bundles"]
    # Bundle 0 hosts the replica actor: its CPUs, memory and node-group pin, no GPU.
    assert bundles[0] == {"CPU": 4.0, "pool_x": 0.001, "memory": float(2**30)}
    assert bundles[1:] == [{"GPU": 1.0}] * 4
    assert opts["placement_group_strategy"] == STRATEGY == "STRICT_PACK"
    assert opts["ray_actor_options"]["num_gpus"] == 0
    assert opts["ray_actor_options"]["num_cpus"] == 4
    # The router and the rest of the replica options are untouched.
    assert opts["max_ongoing_requests"] == _pool(1).replica.max_ongoing_requests


def test_serve_accepts_the_placement_options() -> None:
    from eft_serve.serve.pool_deployment import ModelPoolDeployment

    pool = _pool(8)
    dep = ModelPoolDeployment.options(**pool_deployment_options(pool))
    assert dep._deployment_config is not None
    replica_cfg = dep._replica_config
    assert replica_cfg.placement_group_bundles is not None and len(replica_cfg.placement_group_bundles) == 9
    assert replica_cfg.placement_group_strategy == "STRICT_PACK"


def test_tensor_parallel_needs_one_gpu_per_shard() -> None:
    with pytest.raises(ValidationError, match="replica.num_gpus must be 4"):
        PoolConfig.model_validate(
            {"model": "/m", "engine": "vllm", "vllm": {"tensor_parallel_size": 4}, "replica": {"num_gpus": 1}}
        )
    derived = PoolConfig.model_validate({"model": "/m", "engine": "vllm", "vllm": {"tensor_parallel_size": 4}})
    assert derived.replica.num_gpus == 4
    # The hf engine ignores the vllm block.
    hf = PoolConfig.model_validate(
        {"model": "/m", "engine": "hf", "vllm": {"tensor_parallel_size": 4}, "replica": {"num_gpus": 1}}
    )
    assert apply_tensor_parallel(hf, {"ray_actor_options": {"num_gpus": 1}}) == {"ray_actor_options": {"num_gpus": 1}}
    with pytest.raises(ValidationError):
        PoolConfig.model_validate({"model": "/m", "engine": "vllm", "vllm": {"tensor_parallell_size": 2}})


def test_prod_serves_the_70b_base_four_way_and_k8s_sizes_its_pods_from_it() -> None:
    cfg = load_config(ROOT / "deploy/prod.yaml")
    large = cfg.pools["large_base"]
    assert large.engine == "vllm" and large.vllm.tensor_parallel_size == 4
    # 4 x 80 GB GPUs hold the ~138 GB of bf16 weights with room for KV at 90% utilisation.
    assert 138 / 4 < 80 * large.vllm.gpu_memory_utilization
    opts = pool_deployment_options(large)
    assert len(opts["placement_group_bundles"]) == 5
    settings = parse_settings(yaml.safe_load((ROOT / "k8s/settings/prod.yaml").read_text()), "prod")
    assert isinstance(settings, StackSettings)
    # Neither file names the GPU count: TP size 4 -> replica.num_gpus 4 -> a pod of 4 GPUs.
    assert settings.pools["large_base"].gpus is None and large.replica.num_gpus == 4
    pod = with_derived_gpus(cfg, settings).pools["large_base"]
    assert pod.gpus == 4 and replicas_per_pod(large.replica, pod) == 1
    a = large.replica.autoscaling
    assert a is not None and pod_counts(large.replica, pod) == (a.min_replicas, a.min_replicas, a.max_replicas)
    # A pod with fewer GPUs than one replica's shards holds no replica (the renderer's check refuses it).
    small = PodSettings(cpu="8", memory="200Gi", gpus=2)
    assert replicas_per_pod(large.replica, small) == 0


@pytest.mark.parametrize("tp", [2, 8])
def test_the_rendered_gpu_pod_follows_the_tensor_parallel_size(tp: int) -> None:
    data = yaml.safe_load((ROOT / "deploy/prod.yaml").read_text())
    data["pools"]["large_base"]["vllm"]["tensor_parallel_size"] = tp
    cfg = EftConfig.model_validate(data)
    assert cfg.pools["large_base"].replica.num_gpus == tp
    settings = parse_settings(yaml.safe_load((ROOT / "k8s/settings/prod.yaml").read_text()), "prod")
    assert isinstance(settings, StackSettings)
    docs = render_stack(cfg, settings, "prod")
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    (group,) = [g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if "large" in g["groupName"]]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == tp
    assert group["rayStartParams"]["num-gpus"] == str(tp)
    # An explicit count that disagrees with the TP size is refused at config load.
    data["pools"]["large_base"]["replica"]["num_gpus"] = tp // 2
    with pytest.raises(ValidationError, match=f"num_gpus must be {tp}"):
        EftConfig.model_validate(data)
