"""Telemetry and the access log over real gRPC on loopback (fake-engine pools, no Ray): what each
call reports (status, key id, tokens, TTFT, token gaps, pool calls and retries) and the JSON line
the access log writes for it — without prompt text unless configured."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import grpc
import pytest

from eft_serve.auth.gate import Gate
from eft_serve.auth.keys import add_key, load_key_store
from eft_serve.client import AsyncEftClient
from eft_serve.config import CoordinatorConfig
from eft_serve.coordinator.access_log import AccessLog
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.coordinator.telemetry import FanOut, RequestRecord
from eft_serve.testing.fake_engine import FakeEngine
from eft_serve.testing.grpc_coordinator import start_coordinator_server, start_pool_server
from eft_serve.testing.grpc_pool import GrpcPoolClient
from eft_serve.transport.coordinator_rpc import CoordinatorRpc
from eft_serve.transport.pool_rpc import PoolRpc

from fakes import EOS, RECIPES, VOCAB, CharTokenizer, fake_engines

SECRET_PROMPT = "my secret prompt"


class Recorder:
    """A `Telemetry` that keeps what it is told (stands in for the Prometheus exporter, not for a model)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[RequestRecord] = []
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.pool_calls: list[tuple[str, str, float, str]] = []
        self.retries: list[tuple[str, str]] = []

    def request_started(self, record: RequestRecord) -> None:
        self.started.append(record.method)

    def first_token(self, record: RequestRecord, seconds: float) -> None:
        self.ttft.append(seconds)

    def inter_token(self, record: RequestRecord, seconds: float) -> None:
        self.gaps.append(seconds)

    def request_finished(self, record: RequestRecord) -> None:
        self.finished.append(record)

    def pool_call(self, role: str, call: str, seconds: float, status: str) -> None:
        self.pool_calls.append((role, call, seconds, status))

    def pool_retry(self, role: str, status: str) -> None:
        self.retries.append((role, status))


def _access_logger() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    logger = logging.getLogger(f"eft_serve.access.test{id(out)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(out))
    return logger, out


async def _stack(tmp_path, include_prompt: bool = False, retries: int = 0):
    """Pools over gRPC (so a pool can really go away), the coordinator over gRPC, auth on."""
    engines = fake_engines()
    engines["large_base"] = FakeEngine(VOCAB, seed=1, name="large_base", eos_token_id=EOS, max_context=96, delay_s=0.01)
    servers, pools = {}, {}
    for role, engine in engines.items():
        servers[role], port = await start_pool_server(PoolRpc(engine, role))
        pools[role] = GrpcPoolClient(f"127.0.0.1:{port}", role, timeout_s=2.0)
    recorder = Recorder()
    logger, lines = _access_logger()
    telemetry = FanOut([recorder, AccessLog(include_prompt=include_prompt, logger=logger)])
    cfg = CoordinatorConfig(max_new_tokens_cap=64, pool_call_timeout_s=2.0, pool_call_retries=retries)
    coord = EftCoordinator(pools, RECIPES, CharTokenizer(), cfg, telemetry=telemetry)
    await coord.start()
    keys_file = tmp_path / "keys.yaml"
    key = add_key(keys_file, "team-a")
    server, port = await start_coordinator_server(
        CoordinatorRpc(coord, Gate(load_key_store(keys_file, None)), telemetry)
    )
    return {
        "address": f"127.0.0.1:{port}",
        "key": key,
        "recorder": recorder,
        "lines": lines,
        "pool_servers": servers,
        "close": [coord.stop, *(p.close for p in pools.values()), lambda: server.stop(grace=None)]
        + [lambda s=s: s.stop(grace=None) for s in servers.values()],
    }


@pytest.fixture
async def stack(tmp_path):
    s = await _stack(tmp_path)
    try:
        yield s
    finally:
        for close in s["close"]:
            await close()


def _lines(stack) -> list[dict]:
    return [json.loads(line) for line in stack["lines"].getvalue().splitlines()]


async def test_a_stream_reports_its_tokens_timings_and_pool_calls(stack) -> None:
    rec = stack["recorder"]
    async with AsyncEftClient(stack["address"], timeout=20, api_key=stack["key"]) as client:
        out = await client.complete(SECRET_PROMPT, temperature=0, max_new_tokens=6, ignore_eos=True, request_id="req-1")
    assert out.usage.completion_tokens == 6
    (record,) = rec.finished
    assert (record.method, record.status, record.recipe, record.key_id) == ("Generate", "OK", "upscale", "team-a")
    assert record.completion_tokens == 6 and record.prompt_tokens == len(SECRET_PROMPT)
    # One TTFT and one gap per later token; the large base sleeps 10 ms per call, so neither is ~0.
    assert len(rec.ttft) == 1 and len(rec.gaps) == 5
    assert rec.ttft[0] >= 0.01 and min(rec.gaps) >= 0.009
    assert record.ttft_s == rec.ttft[0] and record.latency_s >= record.ttft_s + sum(rec.gaps) * 0.99
    # Every step calls each pool of the recipe once, all OK, and the slow one takes its 10 ms.
    by_role: dict[str, list[float]] = {}
    for role, call, seconds, status in rec.pool_calls:
        assert (call, status) == ("next_token", "OK")
        by_role.setdefault(role, []).append(seconds)
    assert {r: len(v) for r, v in by_role.items()} == {"large_base": 6, "small_ft": 6, "small_base": 6}
    assert min(by_role["large_base"]) >= 0.009
    (line,) = _lines(stack)
    assert line["request_id"] == "req-1" and line["key_id"] == "team-a" and line["status"] == "OK"
    assert line["completion_tokens"] == 6 and line["prompt_tokens"] == len(SECRET_PROMPT)
    assert line["latency_ms"] >= line["ttft_ms"] > 0
    assert "prompt" not in line and SECRET_PROMPT not in stack["lines"].getvalue()


async def test_refusals_and_errors_are_reported_with_their_status(stack) -> None:
    rec = stack["recorder"]
    async with AsyncEftClient(stack["address"], timeout=20, api_key=stack["key"]) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete("hello", recipe="no-such-recipe", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete("hello", temperature=-1.0, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        scored = await client.score("hello", " there")
        assert scored.tokens
    async with AsyncEftClient(stack["address"], timeout=20, api_key="eft_wrong") as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete("hello", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    got = [(r.method, r.recipe, r.status, r.key_id) for r in rec.finished]
    assert got == [
        ("Generate", "no-such-recipe", "NOT_FOUND", "team-a"),
        ("Generate", "upscale", "INVALID_ARGUMENT", "team-a"),
        ("Score", "upscale", "OK", "team-a"),
        ("Generate", "upscale", "UNAUTHENTICATED", "-"),
    ]
    assert [line["status"] for line in _lines(stack)] == ["NOT_FOUND", "INVALID_ARGUMENT", "OK", "UNAUTHENTICATED"]
    assert len(rec.started) == len(rec.finished)  # in-flight goes back to zero


async def test_a_cancelled_stream_is_reported_cancelled(stack) -> None:
    rec = stack["recorder"]
    async with AsyncEftClient(stack["address"], timeout=20, api_key=stack["key"]) as client:
        stream = client.generate("hello", temperature=0, max_new_tokens=60, ignore_eos=True)
        async for _ in stream:
            break  # the client walks away after the first token
        stream.cancel()
        for _ in range(200):
            if rec.finished:
                break
            await asyncio.sleep(0.02)
    (record,) = rec.finished
    assert record.status == "CANCELLED" and record.ttft_s is not None


async def test_a_pool_that_goes_away_shows_failed_calls_and_retries(tmp_path) -> None:
    s = await _stack(tmp_path, include_prompt=True, retries=1)
    try:
        await s["pool_servers"]["small_base"].stop(grace=None)
        async with AsyncEftClient(s["address"], timeout=20, api_key=s["key"]) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.complete(SECRET_PROMPT, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rec = s["recorder"]
        failed = [(role, status) for role, _, _, status in rec.pool_calls if status != "OK"]
        # The first attempt failed, was retried once, and the retry failed too.
        assert failed == [("small_base", "UNAVAILABLE")] * 2, rec.pool_calls
        assert rec.retries == [("small_base", "UNAVAILABLE")]
        (line,) = _lines(s)
        assert line["status"] == "UNAVAILABLE" and line["prompt"] == SECRET_PROMPT  # include_prompt: true
    finally:
        for close in s["close"]:
            await close()
