"""`eft serve` keeps Serve's gRPC proxy on loopback: the worker setup hook rewrites Serve's
hard-coded `[::]:<port>` in the function Serve's proxy calls to bind (a real grpc server here)."""

from __future__ import annotations

import socket

import grpc
import pytest

from eft_serve.infra.ports import free_port
from eft_serve.serve import loopback_grpc


def test_rewrite_only_touches_the_wildcard_address() -> None:
    assert loopback_grpc.rewrite_address("[::]:9000", "127.0.0.1") == "127.0.0.1:9000"
    assert loopback_grpc.rewrite_address("10.0.0.1:9000", "127.0.0.1") == "10.0.0.1:9000"


def test_runtime_env_names_an_importable_hook() -> None:
    env = loopback_grpc.runtime_env("127.0.0.1")
    module, _, func = env["worker_process_setup_hook"].rpartition(".")  # Ray's own dotted-path convention
    assert module == loopback_grpc.__name__ and callable(getattr(loopback_grpc, func))
    assert env["env_vars"] == {loopback_grpc.HOST_ENV: "127.0.0.1"}


def test_hook_makes_serves_grpc_helper_bind_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve._private import default_impl

    monkeypatch.setattr(default_impl, "add_grpc_address", default_impl.add_grpc_address)  # restored after
    monkeypatch.setenv(loopback_grpc.HOST_ENV, "127.0.0.1")
    loopback_grpc.bind_grpc_proxy_host()
    loopback_grpc.bind_grpc_proxy_host()  # idempotent: one wrapper, not two
    port = free_port()
    server = grpc.server(_executor())
    try:
        default_impl.add_grpc_address(server, f"[::]:{port}")  # what Serve's proxy calls
        server.start()
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        # Another local address of this machine (127.0.0.2 is loopback too, but not the bound one).
        with pytest.raises(OSError), socket.create_connection(("127.0.0.2", port), timeout=2):
            pass
    finally:
        server.stop(None)


def _executor():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1)
