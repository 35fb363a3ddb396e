"""One local multi-node Ray cluster + the whole Serve stack for the whole test session.

A head node (127.0.0.2: Serve controller, gRPC proxy, coordinator) and one worker node per
pool (127.0.0.3-5), each offering only its pool's resource, so placement is real. The large-base
pool autoscales (1-3 replicas); the small pools autoscale too but with a target they never reach.
"""

from __future__ import annotations

import os

import pytest

from eft_serve.config import EftConfig, demo_config
from eft_serve.infra.ports import free_port
from eft_serve.testing.multinode_cluster import LocalMultiNodeCluster, autoscaling_demo_config

ROLES = ["large_base", "small_base", "small_ft"]
PINNED_CPU = max(os.sched_getaffinity(0))


def cluster_config(redis_url: str) -> EftConfig:
    data = autoscaling_demo_config(demo_config()).model_dump()
    data["grpc"]["port"] = free_port()
    data["coordinator"].update(pool_call_timeout_s=10.0, max_new_tokens_cap=128, startup_timeout_s=180.0)
    data["cache"]["url"] = redis_url
    # One pool pinned to one CPU (the others are not): test_serve_stack checks its replica threads.
    data["pools"]["small_ft"]["replica"]["cpu_affinity"] = [PINNED_CPU]
    return EftConfig.model_validate(data)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from eft_serve.serve.app import proxy_env

    # The Serve proxy reads its gRPC message-size cap from its environment only (inherited by
    # the head's processes from here), as `eft serve` and the Kubernetes head pod set it.
    for name, value in proxy_env(demo_config()).items():
        os.environ.setdefault(name, value)
    cluster = LocalMultiNodeCluster(ROLES).start()
    try:
        ray.init(address=cluster.address, _node_ip_address=cluster.head_ip, namespace="eft", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def cluster_stack(demo_family, redis_server, ray_cluster):
    from eft_serve.stack import local_stack

    cfg = cluster_config(redis_server.url)
    with local_stack(cfg, http_port=free_port(), log=lambda m: print(f"[cluster] {m}")) as effective:
        yield {
            "config": effective,
            "address": f"127.0.0.1:{effective.grpc.port}",
            "family": demo_family,
            "cluster": ray_cluster,
            "pinned_cpu": PINNED_CPU,
        }
