"""The config tree: strict validation, defaults, and the committed deploy files staying in sync."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from eft_serve.config import EftConfig, PoolConfig, ReplicaConfig, demo_config, load_config
from eft_serve.serve.app import render_serve_yaml, serve_config

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_keys_are_rejected_at_every_level() -> None:
    data = demo_config().model_dump()
    data["pools"]["large_base"]["replica"]["max_ongoing_request"] = 3  # typo
    with pytest.raises(ValidationError, match="max_ongoing_request"):
        EftConfig.model_validate(data)
    data = demo_config().model_dump()
    data["coordinatr"] = {}
    with pytest.raises(ValidationError, match="coordinatr"):
        EftConfig.model_validate(data)


def test_autoscaling_target_must_be_below_max_ongoing() -> None:
    with pytest.raises(ValidationError, match="never scales"):
        ReplicaConfig(max_ongoing_requests=4, autoscaling={"target_ongoing_requests": 4, "max_replicas": 3})
    ok = ReplicaConfig(
        max_ongoing_requests=8,
        autoscaling={"target_ongoing_requests": 2, "max_replicas": 3},
        node_group_resource="pool_large_base",
    )
    opts = ok.deployment_options()
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in opts
    assert opts["ray_actor_options"]["resources"] == {"pool_large_base": 0.001}


def test_pools_leave_serves_per_call_access_log_off_unless_asked() -> None:
    from eft_serve.serve.app import pool_deployment_options

    assert pool_deployment_options(PoolConfig(model="demo:small_ft"))["logging_config"] == {"enable_access_log": False}
    on = PoolConfig(model="demo:small_ft", replica={"serve_access_log": True})
    assert pool_deployment_options(on)["logging_config"] == {"enable_access_log": True}
    # The coordinator keeps Serve's default (one line per request) unless told.
    assert "logging_config" not in demo_config().coordinator.replica.deployment_options()
    quiet = ReplicaConfig(serve_access_log=False).deployment_options()
    assert quiet["logging_config"] == {"enable_access_log": False}


@pytest.mark.parametrize(("cpus", "match"), [([], "at least 1"), ([0, 0], "twice"), ([-1], "greater than")])
def test_cpu_affinity_is_a_set_of_cpu_ids(cpus: list[int], match: str) -> None:
    assert ReplicaConfig().cpu_affinity is None
    assert ReplicaConfig(cpu_affinity=[1, 0]).cpu_affinity == [1, 0]
    with pytest.raises(ValidationError, match=match):
        ReplicaConfig(cpu_affinity=cpus)


def test_recipes_must_reference_existing_pools() -> None:
    data = demo_config().model_dump()
    del data["pools"]["small_base"]
    with pytest.raises(ValidationError, match="small_base"):
        EftConfig.model_validate(data)
    data = demo_config().model_dump()
    data["coordinator"]["default_recipe"] = "missing"
    with pytest.raises(ValidationError, match="default_recipe"):
        EftConfig.model_validate(data)


def test_with_models_overrides_paths() -> None:
    cfg = demo_config().with_models(large_base="/models/big", small_ft=None)
    assert cfg.pools["large_base"].model == "/models/big"
    assert cfg.pools["small_ft"].model == "demo:small_ft"
    with pytest.raises(ValueError, match="no pool"):
        demo_config().with_models(huge="/x")


def test_full_family_has_interpolation_and_downscale() -> None:
    cfg = demo_config(full_family=True)
    assert {"interpolate", "downscale", "upscale"} <= set(cfg.recipes)


def test_committed_deploy_files_are_in_sync() -> None:
    committed = load_config(ROOT / "deploy" / "demo.yaml")
    assert committed == demo_config()
    assert (ROOT / "deploy" / "serve_demo.yaml").read_text() == render_serve_yaml(committed)


def test_serve_config_shape() -> None:
    sc = serve_config(demo_config())
    names = [a["name"] for a in sc["applications"]]
    assert names[-1] == "eft" and {"pool-large_base", "pool-small_base", "pool-small_ft"} <= set(names)
    # Only the coordinator is routable, so gRPC clients need no `application` metadata.
    assert [a["route_prefix"] for a in sc["applications"] if a["route_prefix"]] == ["/"]
    assert sc["proxy_location"] == "HeadOnly"
    yaml.safe_load(render_serve_yaml(demo_config()))


def test_local_ray_has_room_for_every_replica_at_full_scale() -> None:
    from eft_serve.serve.local import local_num_cpus
    from eft_serve.testing.multinode_cluster import autoscaling_demo_config

    # demo: 3 pools x 1 CPU + coordinator 0.5 -> 4, even on a 2-core machine
    assert local_num_cpus(demo_config()) >= 4
    # large_base autoscales to 3 replicas, small pools to 2 each: 3 + 2 + 2 + 0.5 -> 8
    assert local_num_cpus(autoscaling_demo_config(demo_config())) >= 8
    data = demo_config().model_dump()
    data["ray"]["num_cpus"] = 3
    assert local_num_cpus(EftConfig.model_validate(data)) == 3


def test_a_partial_replica_keeps_the_pool_and_coordinator_defaults_it_leaves_out() -> None:
    from eft_serve.config import CoordinatorConfig

    pool = PoolConfig(model="demo:small_ft", replica={"num_replicas": 2})
    assert pool.replica.num_replicas == 2
    assert pool.replica.max_ongoing_requests == PoolConfig(model="demo:small_ft").replica.max_ongoing_requests == 64
    coordinator = CoordinatorConfig(replica={"num_replicas": 3})
    assert (coordinator.replica.num_cpus, coordinator.replica.max_ongoing_requests) == (0.5, 64)
    assert PoolConfig(model="x", replica={"max_ongoing_requests": 8}).replica.max_ongoing_requests == 8
