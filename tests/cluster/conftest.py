"""One local Ray cluster + the whole Serve stack for the whole test session (started once)."""

from __future__ import annotations

import socket

import pytest

from eft_serve.config import EftConfig, demo_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cluster_stack(demo_family, redis_server):
    from eft_serve.stack import local_stack

    data = demo_config().model_dump()
    data["grpc"]["port"] = free_port()
    data["coordinator"].update(pool_call_timeout_s=10.0, max_new_tokens_cap=128, startup_timeout_s=120.0)
    data["cache"]["url"] = redis_server.url
    data["ray"]["num_cpus"] = 8
    cfg = EftConfig.model_validate(data)
    with local_stack(cfg, http_port=free_port(), log=lambda m: print(f"[cluster] {m}")) as effective:
        yield {"config": effective, "address": f"127.0.0.1:{effective.grpc.port}", "family": demo_family}
