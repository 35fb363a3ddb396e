"""Health: the coordinator's cached pool probe over real gRPC loopback, and the pool replica check."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eft_serve.client import AsyncEftClient
from eft_serve.config import CoordinatorConfig
from eft_serve.coordinator.health import HealthReport, PoolProber
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.errors import ResourceExhausted, Unavailable
from eft_serve.testing.fake_engine import FakeEngine
from eft_serve.testing.grpc_coordinator import SERVICE_NAME, start_coordinator_server, start_pool_server
from eft_serve.testing.grpc_pool import GrpcPoolClient
from eft_serve.transport.coordinator_rpc import CoordinatorRpc
from eft_serve.transport.pool_rpc import PoolRpc

from fakes import EOS, RECIPES, VOCAB, CharTokenizer, fake_engines

PERIOD_S = 0.1
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def stack():
    # large_base is slow (every forward 0.2 s), so a request can be in flight while we check health.
    engines = fake_engines(
        large_base=FakeEngine(VOCAB, seed=1, name="large_base", eos_token_id=EOS, max_context=96, delay_s=0.2)
    )
    servers, pools = {}, {}
    for role, engine in engines.items():
        servers[role], port = await start_pool_server(PoolRpc(engine, role))
        pools[role] = GrpcPoolClient(f"127.0.0.1:{port}", role, timeout_s=2.0)
    cfg = CoordinatorConfig(
        max_new_tokens_cap=64,
        pool_call_timeout_s=2.0,
        pool_call_retries=0,
        health_probe_period_s=PERIOD_S,
        health_probe_timeout_s=0.5,
    )
    coord = EftCoordinator(pools, RECIPES, CharTokenizer(), cfg)
    await coord.start()
    server, port = await start_coordinator_server(CoordinatorRpc(coord))
    try:
        yield {"address": f"127.0.0.1:{port}", "pool_servers": servers, "coordinator": coord}
    finally:
        await coord.stop()
        for c in pools.values():
            await c.close()
        for s in [*servers.values(), server]:
            await s.stop(grace=None)


async def _check(channel: grpc.aio.Channel, service: str = SERVICE_NAME) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def _wait_for(channel: grpc.aio.Channel, status: int, within_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if await _check(channel) == status:
            return time.monotonic() - start
        await asyncio.sleep(PERIOD_S / 4)
    raise AssertionError(f"health did not become {status} within {within_s}s")


async def test_serving_at_start_then_not_serving_when_a_pool_goes_down(stack) -> None:
    async with grpc.aio.insecure_channel(stack["address"]) as channel:
        assert await _check(channel) == SERVING
        assert await _check(channel, "") == SERVING
        await stack["pool_servers"]["small_base"].stop(grace=None)
        await _wait_for(channel, NOT_SERVING, within_s=10 * PERIOD_S + 1.0)
        assert await _check(channel, "") == NOT_SERVING
    report = stack["coordinator"].health()
    assert not report.serving and report.unreachable == ("small_base",) and "small_base" in report.detail
    async with AsyncEftClient(stack["address"], timeout=20) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete("ab", temperature=0, max_new_tokens=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "small_base" in err.value.details()


async def test_watch_sees_the_change(stack) -> None:
    async with grpc.aio.insecure_channel(stack["address"]) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        seen = []
        stopped = False
        async for reply in call:
            seen.append(reply.status)
            if not stopped:
                await stack["pool_servers"]["small_ft"].stop(grace=None)
                stopped = True
            if reply.status == NOT_SERVING:
                break
        call.cancel()
        assert seen[0] == SERVING and seen[-1] == NOT_SERVING


async def test_health_answers_at_once_while_a_slow_request_is_in_flight(stack) -> None:
    async with AsyncEftClient(stack["address"], timeout=30) as client:
        slow = asyncio.ensure_future(client.complete("ab", temperature=0, max_new_tokens=10, ignore_eos=True))
        await asyncio.sleep(0.3)  # the request is now waiting on the slow large_base pool
        assert not slow.done()
        async with grpc.aio.insecure_channel(stack["address"]) as channel:
            for _ in range(5):  # several probe periods: the slow pool still answers Info
                start = time.monotonic()
                assert await _check(channel) == SERVING
                assert time.monotonic() - start < 0.2
                await asyncio.sleep(PERIOD_S)
        assert not slow.done()
        reply = await slow
        assert len(reply.token_ids) == 10


# ---- the probe's logic, with pools that fail in controlled ways ------------------------------


class _Pool:
    def __init__(self, role: str) -> None:
        self.role = role
        self.error: Exception | None = None
        self.delay_s = 0.0

    async def info(self):
        await asyncio.sleep(self.delay_s)
        if self.error:
            raise self.error
        return None


async def test_prober_verdicts_and_listener() -> None:
    pools = {"a": _Pool("a"), "b": _Pool("b")}
    prober = PoolProber(pools, period_s=60.0, timeout_s=0.1)
    changes: list[HealthReport] = []

    async def listen(report: HealthReport) -> None:
        changes.append(report)

    prober.add_listener(listen)
    assert not prober.report().serving  # not started
    await prober.start()
    try:
        assert prober.report().serving and len(changes) == 1
        pools["a"].error = Unavailable("gone")
        pools["b"].delay_s = 1.0  # misses the 0.1 s timeout
        report = await prober.probe_once()
        assert not report.serving and report.unreachable == ("a", "b") and "0.1s" in report.detail
        await prober.probe_once()  # same verdict: no new notification
        assert len(changes) == 2
        pools["a"].error = ResourceExhausted("busy")  # it answered: busy, not unreachable
        pools["b"].delay_s = 0.0
        assert (await prober.probe_once()).serving and len(changes) == 3
    finally:
        await prober.stop()
        await prober.stop()  # idempotent


# ---- the pool replica's health check (what ModelPoolDeployment.check_health runs) ------------


async def test_pool_health_check_passes_on_a_healthy_engine() -> None:
    engine = FakeEngine(VOCAB, name="ok")
    await PoolRpc(engine, "ok").check_health(timeout_s=5.0)
    assert engine.num_calls == 1 and engine.last_logprob_top_k == 1


async def test_pool_health_check_fails_within_its_timeout_on_a_hung_engine() -> None:
    rpc = PoolRpc(FakeEngine(VOCAB, name="hung", delay_s=1.0), "hung")
    start = time.monotonic()
    with pytest.raises(Unavailable, match="hung.*0.2s"):
        await rpc.check_health(timeout_s=0.2)
    assert time.monotonic() - start < 0.6
    # The engine call cannot be stopped: the next one waits for it instead of overlapping it.
    start = time.monotonic()
    await rpc.check_health(timeout_s=5.0)
    assert time.monotonic() - start > 0.5


async def test_pool_health_check_fails_on_an_engine_error() -> None:
    def broken(prefix: tuple[int, ...]):
        raise RuntimeError("CUDA error: device lost")

    rpc = PoolRpc(FakeEngine(VOCAB, name="broken", logits_fn=broken), "broken")
    with pytest.raises(Unavailable, match="device lost"):
        await rpc.check_health(timeout_s=5.0)
