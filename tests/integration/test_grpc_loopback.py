"""Pools and coordinator over real gRPC on loopback (no Ray): streaming, status codes, health, reflection."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from eft_serve import cli
from eft_serve.client import AsyncEftClient
from eft_serve.config import CoordinatorConfig
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.proto_gen.eft.v1 import eft_pb2
from eft_serve.testing.grpc_coordinator import SERVICE_NAME, start_coordinator_server, start_pool_server
from eft_serve.testing.grpc_pool import GrpcPoolClient
from eft_serve.transport.coordinator_rpc import CoordinatorRpc
from eft_serve.transport.pool_rpc import PoolRpc

from fakes import RECIPES, CharTokenizer, fake_engines


@pytest.fixture
async def stack():
    servers, clients = [], []
    engines = fake_engines()
    pools = {}
    rpcs = {}
    for role, engine in engines.items():
        rpcs[role] = PoolRpc(engine, role)
        server, port = await start_pool_server(rpcs[role])
        servers.append(server)
        pools[role] = GrpcPoolClient(f"127.0.0.1:{port}", role, timeout_s=2.0)
        clients.append(pools[role])
    coord = EftCoordinator(
        pools, RECIPES, CharTokenizer(), CoordinatorConfig(max_new_tokens_cap=64, pool_call_timeout_s=2.0)
    )
    await coord.start()
    server, port = await start_coordinator_server(CoordinatorRpc(coord))
    servers.append(server)
    try:
        yield {"address": f"127.0.0.1:{port}", "pool_servers": servers[:-1], "engines": engines, "rpcs": rpcs}
    finally:
        await coord.stop()
        for c in clients:
            await c.close()
        for s in servers:
            await s.stop(grace=None)


@pytest.mark.parametrize("logprob_top_k", [0, 7])
async def test_speculative_over_grpc_pools_equals_plain(stack, logprob_top_k: int) -> None:
    # Drafts travel over the pool wire with the drafter's own scores (one call, not two).
    async with AsyncEftClient(stack["address"], timeout=20) as client:
        for sampling in (dict(temperature=0), dict(temperature=1.0, seed=3)):
            kw = dict(max_new_tokens=16, ignore_eos=True, logprob_top_k=logprob_top_k, **sampling)
            plain = await client.complete("hello", speculative=False, **kw)
            fast = await client.complete("hello", speculative=True, max_draft_tokens=4, **kw)
            assert list(fast.token_ids) == list(plain.token_ids) and fast.usage.speculative_blocks > 0
            # A block costs 3 calls (small_ft's draft + scores, the two other pools); so does a
            # plain step (the budget's last token). Each block yields its kept drafts + 1 token.
            u = fast.usage
            plain_steps = u.completion_tokens - u.accepted_tokens - u.speculative_blocks
            assert u.pool_calls == 3 * (u.speculative_blocks + plain_steps)


async def test_pools_are_sent_only_new_tokens_and_recover_when_they_forget(stack) -> None:
    rpc = stack["rpcs"]["large_base"]
    prompt, n = "the quick brown fox jumps", 20
    async with AsyncEftClient(stack["address"], timeout=20) as client:
        kw = dict(temperature=0, max_new_tokens=n, ignore_eos=True, request_id="seq-a")
        first = await client.complete(prompt, **kw)
        received = rpc.tokens_received
        # Whole prompt once, then one new token per step (not the whole prefix every step).
        assert received == len(prompt) + (n - 1)
        assert rpc.sequences.restored == n - 1 and rpc.sequences.unknown == 0
        # A replica that lost its memory (restart, another replica) is sent whole prefixes again.
        stream = client.generate(prompt, **{**kw, "request_id": "seq-b"})
        texts = []
        async for msg in stream:
            texts.append(msg.text)
            if len(texts) == 3:
                rpc.sequences.clear()
        assert "".join(texts) == first.text
        assert rpc.sequences.unknown >= 1


async def test_stream_and_complete_agree(stack) -> None:
    async with AsyncEftClient(stack["address"], timeout=20) as client:
        msgs = [
            m
            async for m in client.generate(
                "hello", temperature=0, max_new_tokens=12, ignore_eos=True, return_logprobs=True
            )
        ]
        assert msgs[-1].finish_reason == eft_pb2.FINISH_REASON_LENGTH
        assert msgs[-1].usage.completion_tokens == 12
        text = "".join(m.text for m in msgs)
        done = await client.complete("hello", temperature=0, max_new_tokens=12, ignore_eos=True)
        assert done.text == text and len(done.token_ids) == 12
        models = await client.list_models()
        assert {m.role for m in models.models} == set(stack["engines"])
        recipes = await client.list_recipes()
        assert "upscale" in {r.name for r in recipes.recipes}


async def test_top_logprobs_over_grpc(stack) -> None:
    async with AsyncEftClient(stack["address"], timeout=20) as client:
        kw = dict(temperature=0, max_new_tokens=10, ignore_eos=True, logprob_top_k=0, top_logprobs=4)
        msgs = [m async for m in client.generate("hello", **kw)]
        tokens = [t for m in msgs for t in m.tokens]
        assert len(tokens) == 10
        for t in tokens:
            alts = list(t.top_logprobs)
            assert len(alts) == 4 and len({a.token_id for a in alts}) == 4
            # Greedy: the chosen token leads, with its merged logprob (implied return_logprobs).
            assert alts[0].token_id == t.token_id and alts[0].logprob == pytest.approx(t.logprob) and t.logprob < 0
            assert [a.logprob for a in alts] == sorted((a.logprob for a in alts), reverse=True)
            assert all(a.text == CharTokenizer().decode([a.token_id]) for a in alts)
        # Complete keeps the tokens (and their alternatives) when only top_logprobs asked for them.
        done = await client.complete("hello", **kw)
        assert [[(a.token_id, a.text) for a in t.top_logprobs] for t in done.tokens] == [
            [(a.token_id, a.text) for a in t.top_logprobs] for t in tokens
        ]
        # Not asked: no alternatives on the wire.
        plain = [t async for m in client.generate("hello", temperature=0, max_new_tokens=3) for t in m.tokens]
        assert all(len(t.top_logprobs) == 0 for t in plain)


@pytest.mark.parametrize("logprob_top_k", [0, 3])
async def test_model_top_logprobs_over_grpc_are_each_models_own(stack, logprob_top_k: int) -> None:
    # With return_model_logprobs and top_logprobs, each token carries each model's own top-N at its
    # prefix: the engines' numbers (in top-k mode, at most k of them: what the pool sent).
    engines, tok, n = stack["engines"], CharTokenizer(), 5
    async with AsyncEftClient(stack["address"], timeout=20) as client:
        kw = dict(temperature=0, max_new_tokens=8, ignore_eos=True, logprob_top_k=logprob_top_k, top_logprobs=n)
        tokens = [t async for m in client.generate("hello", return_model_logprobs=True, **kw) for t in m.tokens]
        assert len(tokens) == 8
        prefix = tok.encode("hello")
        for t in tokens:
            assert set(t.model_top_logprobs) == {"large_base", "small_ft", "small_base"}
            for role, alts in t.model_top_logprobs.items():
                own = engines[role].logprobs(prefix)
                want = sorted(range(len(own)), key=lambda i: (-own[i], i))[: min(n, logprob_top_k or n)]
                assert [a.token_id for a in alts.alternatives] == want, role
                assert [a.logprob for a in alts.alternatives] == pytest.approx([own[i] for i in want], abs=1e-5)
                assert [a.text for a in alts.alternatives] == [tok.decode([i]) for i in want]
            prefix.append(t.token_id)
        # Only with both asked: top_logprobs alone leaves the field empty.
        alone = [t async for m in client.generate("hello", **kw) for t in m.tokens]
        assert alone and all(len(t.model_top_logprobs) == 0 for t in alone)


async def test_eft_generate_json_prints_top_logprobs(stack, capsys) -> None:
    argv = ["generate", "hello", "--address", stack["address"], "--temperature", "0", "--max-new-tokens", "5"]
    argv += ["--ignore-eos", "--logprob-top-k", "0", "--top-logprobs", "3", "--json"]
    # The sync client blocks: run it off the loop that serves the stack.
    assert await asyncio.to_thread(cli.main, argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    tokens = [t for line in lines if "tokens" in line for t in line["tokens"]]
    assert len(tokens) == 5 and lines[-1]["token_ids"] == [t["id"] for t in tokens]
    for t in tokens:
        assert [set(a) for a in t["top"]] == [{"id", "text", "logprob"}] * 3
        assert t["top"][0]["id"] == t["id"] and t["top"][0]["logprob"] == pytest.approx(t["logprob"])


@pytest.mark.parametrize(
    "kwargs, code",
    [
        (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="a", top_logprobs=21), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="a", top_logprobs=-1), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="a", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="a", top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="a", max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="a", recipe="nope"), grpc.StatusCode.NOT_FOUND),
        (dict(prompt="a", beta=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_bad_input_status_codes(stack, kwargs, code) -> None:
    async with AsyncEftClient(stack["address"], timeout=20) as client:
        prompt = kwargs.pop("prompt")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [m async for m in client.generate(prompt, **kwargs)]
        assert err.value.code() == code
        assert "Traceback" not in (err.value.details() or "")
        assert len(err.value.details()) > 10


async def test_pool_down_is_unavailable(stack) -> None:
    await stack["pool_servers"][1].stop(grace=None)  # small_base
    async with AsyncEftClient(stack["address"], timeout=20) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [m async for m in client.generate("ab", temperature=0, max_new_tokens=3)]
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "small_base" in err.value.details()


async def test_health_and_reflection(stack) -> None:
    async with grpc.aio.insecure_channel(stack["address"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert SERVICE_NAME in names
