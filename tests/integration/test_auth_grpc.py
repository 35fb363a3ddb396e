"""API keys and quotas over real gRPC on loopback (fake-engine pools): every refusal has its status
and an actionable message; streams hold a concurrency slot while open; health needs no key."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eft_serve.auth.gate import Gate
from eft_serve.auth.keys import add_key, load_key_store
from eft_serve.client import AsyncEftClient, EftClient
from eft_serve.testing.fake_engine import FakeEngine
from eft_serve.testing.grpc_coordinator import SERVICE_NAME, start_coordinator_server
from eft_serve.transport.coordinator_rpc import CoordinatorRpc

from fakes import EOS, VOCAB, counting_key_store, fake_coordinator, fake_engines


async def _serve(gate: Gate | None):
    # A slow large base keeps a stream open long enough to test concurrency.
    slow = FakeEngine(VOCAB, seed=1, name="large_base", eos_token_id=EOS, max_context=96, delay_s=0.02)
    coord = fake_coordinator(fake_engines(large_base=slow))
    await coord.start()
    return await start_coordinator_server(CoordinatorRpc(coord, gate))


@pytest.fixture
async def secured(tmp_path):
    path = tmp_path / "keys.yaml"
    keys = {
        "full": add_key(path, "full", exact_mode=True, max_concurrent_streams=1),
        "narrow": add_key(path, "narrow", allowed_recipes=["large_base"]),
        "metered": add_key(path, "metered", tokens_per_minute=10),
    }
    gate = Gate(load_key_store(path, None))
    server, port = await _serve(gate)
    try:
        yield {"address": f"127.0.0.1:{port}", "keys": keys, "gate": gate}
    finally:
        await server.stop(grace=None)


def _assert_actionable(err: grpc.aio.AioRpcError, code: grpc.StatusCode, *words: str) -> None:
    assert err.code() == code, (err.code(), err.details())
    details = err.details() or ""
    assert "Traceback" not in details and all(w in details for w in words), details


async def test_no_key_and_wrong_key_are_unauthenticated_on_every_rpc(secured) -> None:
    for api_key, words in ((None, ("authorization: Bearer", "--api-key")), ("eft_wrong", ("unknown API key",))):
        async with AsyncEftClient(secured["address"], timeout=10, api_key=api_key) as client:
            calls = [
                lambda: client.complete("hello", max_new_tokens=2),
                lambda: client.score("hello", " there"),
                client.list_recipes,
                client.list_models,
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call()
                _assert_actionable(err.value, grpc.StatusCode.UNAUTHENTICATED, *words)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in client.generate("hello", max_new_tokens=2)]
            _assert_actionable(err.value, grpc.StatusCode.UNAUTHENTICATED, *words)


async def test_valid_key_streams_lists_and_scores(secured) -> None:
    async with AsyncEftClient(secured["address"], timeout=20, api_key=secured["keys"]["full"]) as client:
        msgs = [m async for m in client.generate("hello", temperature=0, max_new_tokens=5, ignore_eos=True)]
        assert msgs[-1].usage.completion_tokens == 5
        assert "upscale" in {r.name for r in (await client.list_recipes()).recipes}
        assert (await client.list_models()).models
        assert (await client.score("hello", " there")).tokens
        exact = await client.complete("hello", temperature=0, max_new_tokens=3, logprob_top_k=0)
        assert exact.usage.logprob_top_k == 0
    assert secured["gate"].limiter.open_calls("full") == 0
    # The blocking client sends the key too.
    with EftClient(secured["address"], timeout=10, api_key=secured["keys"]["narrow"]) as sync_client:
        reply = await asyncio.to_thread(sync_client.list_recipes)
        assert reply.default_recipe == "upscale"


async def test_one_authentication_per_grpc_request(tmp_path) -> None:
    # Every key lookup is one authentication: each RPC (a whole stream, a unary call, a listing)
    # looks its key up exactly once.
    path = tmp_path / "keys.yaml"
    key = add_key(path, "many", exact_mode=True, max_concurrent_streams=8)
    store, lookups = counting_key_store(path)
    server, port = await _serve(Gate(store))
    try:
        async with AsyncEftClient(f"127.0.0.1:{port}", timeout=20, api_key=key) as client:

            async def generate() -> None:
                msgs = [m async for m in client.generate("hello", temperature=0, max_new_tokens=4, ignore_eos=True)]
                assert msgs[-1].usage.completion_tokens == 4

            async def complete() -> None:
                assert len((await client.complete("hello", max_new_tokens=3, ignore_eos=True)).token_ids) == 3

            async def score() -> None:
                assert (await client.score("hello", " there")).tokens

            async def list_models() -> None:
                assert (await client.list_models()).models

            async def list_recipes() -> None:
                assert (await client.list_recipes()).recipes

            for call in (generate, complete, score, list_models, list_recipes):
                lookups.clear()
                await call()
                assert lookups == [key], (call.__name__, lookups)
    finally:
        await server.stop(grace=None)


async def test_recipe_and_exact_mode_need_permission(secured) -> None:
    async with AsyncEftClient(secured["address"], timeout=20, api_key=secured["keys"]["narrow"]) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [m async for m in client.generate("hello", max_new_tokens=2)]  # default recipe: upscale
        _assert_actionable(err.value, grpc.StatusCode.PERMISSION_DENIED, "'upscale'", "large_base")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.score("hello", " x", recipe="upscale")
        _assert_actionable(err.value, grpc.StatusCode.PERMISSION_DENIED, "'upscale'")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete("hello", recipe="large_base", logprob_top_k=0, max_new_tokens=2)
        _assert_actionable(err.value, grpc.StatusCode.PERMISSION_DENIED, "exact mode", "logprob_top_k")
        ok = await client.complete("hello", recipe="large_base", logprob_top_k=5, max_new_tokens=2, ignore_eos=True)
        assert len(ok.token_ids) == 2


def _retry_after(err: grpc.aio.AioRpcError) -> int:
    return int(dict(err.trailing_metadata() or ())["retry-after"])


async def test_a_second_concurrent_stream_over_the_limit_is_refused_until_the_first_ends(secured) -> None:
    limiter = secured["gate"].limiter
    async with AsyncEftClient(secured["address"], timeout=20, api_key=secured["keys"]["full"]) as client:
        first = client.generate("hello", temperature=0, max_new_tokens=60, ignore_eos=True)
        await first.read()  # the stream is open
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [m async for m in client.generate("hello", max_new_tokens=2)]
        _assert_actionable(err.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "1 of its 1 concurrent calls", "retry in")
        assert _retry_after(err.value) >= 1
        first.cancel()  # a cancelled stream gives its slot back
        for _ in range(200):
            if limiter.open_calls("full") == 0:
                break
            await asyncio.sleep(0.01)
        assert limiter.open_calls("full") == 0
        done = await client.complete("hello", max_new_tokens=2, ignore_eos=True)
        assert len(done.token_ids) == 2


async def test_tokens_per_minute_are_charged_as_generated(secured) -> None:
    async with AsyncEftClient(secured["address"], timeout=20, api_key=secured["keys"]["metered"]) as client:
        # 10 tokens a minute: the call in flight may overdraw (12 tokens), the next one must wait.
        done = await client.complete("hello", temperature=0, max_new_tokens=12, ignore_eos=True)
        assert len(done.token_ids) == 12
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [m async for m in client.generate("hello", max_new_tokens=2)]
        _assert_actionable(err.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "10 generated tokens per minute", "retry in")
        # 3 tokens short at 10/60 per second: 18 s.
        assert 17 <= _retry_after(err.value) <= 19
        assert f"retry in {_retry_after(err.value)} s" in (err.value.details() or "")


async def test_health_needs_no_key(secured) -> None:
    async with grpc.aio.insecure_channel(secured["address"]) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_auth_disabled_needs_no_key() -> None:
    server, port = await _serve(None)
    try:
        for api_key in (None, "eft_anything"):
            async with AsyncEftClient(f"127.0.0.1:{port}", timeout=20, api_key=api_key) as client:
                done = await client.complete("hello", max_new_tokens=3, ignore_eos=True, logprob_top_k=0)
                assert len(done.token_ids) == 3 and (await client.list_recipes()).recipes
    finally:
        await server.stop(grace=None)


class ServeContext:
    """Stands in for Ray Serve's RayServegRPCContext: call metadata in, status and trailers out."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: list[tuple[str, str]] = []

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing: list[tuple[str, str]]) -> None:
        self.trailing = trailing


async def test_the_serve_deployment_checks_keys_from_its_grpc_context(tmp_path) -> None:
    from eft_serve.proto_gen.eft.v1 import eft_pb2
    from eft_serve.serve.coordinator_deployment import CoordinatorDeployment
    from eft_serve.transport.error_boundary import RpcFailed

    path = tmp_path / "keys.yaml"
    key = add_key(path, "one", max_concurrent_streams=1)
    coord = fake_coordinator()
    await coord.start()
    deployment = object.__new__(CoordinatorDeployment.func_or_class)  # the servicer, without Ray
    deployment._rpc = CoordinatorRpc(coord, Gate(load_key_store(path, None)))
    deployment._metrics = type("NoMetrics", (), {"export": lambda self: None})()
    bearer = [("authorization", f"Bearer {key}")]

    ctx = ServeContext([])
    with pytest.raises(RpcFailed):
        await deployment.ListRecipes(eft_pb2.ListRecipesRequest(), grpc_context=ctx)
    assert ctx.code == grpc.StatusCode.UNAUTHENTICATED and "authorization" in ctx.details
    assert (await deployment.ListRecipes(eft_pb2.ListRecipesRequest(), grpc_context=ServeContext(bearer))).recipes

    request = eft_pb2.GenerateRequest(prompt="hello", sampling=eft_pb2.SamplingParams(max_new_tokens=4))
    stream = deployment.Generate(request, grpc_context=ServeContext(bearer))
    await stream.__anext__()  # one stream open: the key's only slot
    ctx = ServeContext(bearer)
    with pytest.raises(RpcFailed):
        await deployment.Complete(request, grpc_context=ctx)
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and ctx.trailing == [("retry-after", "1")]
    await stream.aclose()
    assert (await deployment.Complete(request, grpc_context=ServeContext(bearer))).text is not None
