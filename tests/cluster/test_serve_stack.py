"""The whole stack on a real local Ray cluster, through Serve's gRPC proxy."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

from eft_serve.client import EftClient
from eft_serve.config import demo_config
from eft_serve.core.recipe import resolve_recipe
from eft_serve.proto_gen.eft.v1 import eft_pb2
from eft_serve.reference import ReferenceEFT
from eft_serve.testing.replica_processes import replica_processes

T = TypeVar("T")
ROLES = ("large_base", "small_base", "small_ft")

pytestmark = pytest.mark.cluster


def test_streamed_generate_exact_matches_reference(cluster_stack) -> None:
    family = cluster_stack["family"]
    q = family.world.held_out_questions()[0]
    with EftClient(cluster_stack["address"], timeout=120) as client:
        msgs = list(
            client.generate(
                q.prompt,
                temperature=0,
                logprob_top_k=0,
                max_new_tokens=20,
                return_logprobs=True,
                return_model_logprobs=True,
            )
        )
    assert len(msgs) >= 2, "expected a stream of several messages"
    final = msgs[-1]
    assert final.HasField("usage") and final.usage.completion_tokens == sum(len(m.tokens) for m in msgs)
    ids = [t.token_id for m in msgs for t in m.tokens]
    tok = AutoTokenizer.from_pretrained(family.paths["large_base"])
    coefs = resolve_recipe(demo_config().recipes, "upscale").coefficients()
    expected, _ = ReferenceEFT(family.paths, coefs).greedy(tok.encode(q.prompt), 20, tok.eos_token_id)
    assert ids == expected
    assert set(msgs[0].tokens[0].model_logprobs) == {"large_base", "small_ft", "small_base"}


@pytest.mark.parametrize("logprob_top_k", [0, 20])
def test_speculative_through_the_stack_equals_plain_decoding(cluster_stack, logprob_top_k: int) -> None:
    # Draft (small_ft's Draft RPC) + one verification call per pool per block, through the proxy
    # and the Serve handles: same tokens as token-by-token decoding, greedy and seeded sampling.
    family = cluster_stack["family"]
    with EftClient(cluster_stack["address"], timeout=120) as client:
        for q in family.world.held_out_questions()[:2]:
            for sampling in (dict(temperature=0), dict(temperature=1.0, seed=7)):
                kw = dict(logprob_top_k=logprob_top_k, max_new_tokens=20, **sampling)
                plain = client.complete(q.prompt, speculative=False, **kw)
                fast = client.complete(q.prompt, speculative=True, max_draft_tokens=6, **kw)
                assert list(fast.token_ids) == list(plain.token_ids) and fast.text == plain.text
                assert fast.finish_reason == plain.finish_reason
                u = fast.usage
                assert u.speculative_blocks > 0 and u.drafted_tokens >= u.accepted_tokens
                assert u.mean_accepted_length == pytest.approx(u.accepted_tokens / u.speculative_blocks)
                assert plain.usage.speculative_blocks == 0


def test_seeded_sampling_reproducible_through_proxy(cluster_stack) -> None:
    with EftClient(cluster_stack["address"], timeout=120) as client:
        a = client.complete("Q: ", temperature=1.0, seed=11, max_new_tokens=16)
        b = client.complete("Q: ", temperature=1.0, seed=11, max_new_tokens=16)
    assert list(a.token_ids) == list(b.token_ids) and a.text == b.text and a.usage.seed == 11


@pytest.mark.parametrize(
    "kwargs, code",
    [
        (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="x" * 3000), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="a", recipe="no-such-recipe"), grpc.StatusCode.NOT_FOUND),
        (dict(prompt="a", beta=float("inf")), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="a", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="a", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="a", max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="a", max_new_tokens=100_000), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_input_status_codes_through_proxy(cluster_stack, kwargs, code) -> None:
    prompt = kwargs.pop("prompt")
    with EftClient(cluster_stack["address"], timeout=60) as client:
        with pytest.raises(grpc.RpcError) as err:
            list(client.generate(prompt, **kwargs))
    assert err.value.code() == code, err.value.details()
    assert "Traceback" not in err.value.details()


def test_health_reflection_and_discovery(cluster_stack) -> None:
    with grpc.insecure_channel(cluster_stack["address"]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watched = list(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30))
        assert watched and watched[0].status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        names = [
            s.name
            for r in refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
            )
            for s in r.list_services_response.service
        ]
        assert "eft.v1.EftService" in names
    with EftClient(cluster_stack["address"], timeout=30) as client:
        assert {m.role for m in client.list_models().models} == {"large_base", "small_base", "small_ft"}
        assert client.list_recipes().default_recipe == "upscale"
        score = client.score("Q: ", "A")
        assert score.total_logprob < 0 and len(score.tokens) >= 1


def _replica_threads(role: str, read: Callable[[int], T]) -> dict[int, T]:
    """`read(thread id)` for every thread of the pool's replica processes on this host."""
    found: dict[int, T] = {}
    for proc in replica_processes(role):
        try:
            for thread in proc.threads():
                found[thread.id] = read(thread.id)
        except (psutil.Error, ProcessLookupError):
            continue  # a replica or thread that ended meanwhile
    return found


def _replica_thread_cpus(role: str) -> dict[int, set[int]]:
    """CPU masks of every thread of the pool's replica processes on this host, by thread id."""
    return _replica_threads(role, lambda tid: set(os.sched_getaffinity(tid)))


def test_pool_replica_threads_run_on_its_cpu_affinity(cluster_stack) -> None:
    cpu = cluster_stack["pinned_cpu"]
    pinned = _replica_thread_cpus("small_ft")
    assert len(pinned) > 3, "no small_ft replica threads found"
    assert all(mask == {cpu} for mask in pinned.values()), pinned
    if len(os.sched_getaffinity(0)) > 1:
        # Only the configured pool is pinned.
        assert any(mask != {cpu} for mask in _replica_thread_cpus("small_base").values())
    with EftClient(cluster_stack["address"], timeout=60) as client:
        assert client.score("Q: ", "A").total_logprob < 0  # the pinned pool still serves


def test_the_small_pools_run_idle_scheduled_and_the_large_base_does_not(cluster_stack) -> None:
    # The demo's default (cpu_scheduling: idle on small pools), applied in each replica process.
    policies = {role: set(_replica_threads(role, os.sched_getscheduler).values()) for role in ROLES}
    assert policies["small_base"] == policies["small_ft"] == {os.SCHED_IDLE}, policies
    assert policies["large_base"] == {os.SCHED_OTHER}, policies


def test_pool_down_is_unavailable_then_recovers(cluster_stack) -> None:
    from ray import serve

    from eft_serve.serve.app import pool_app
    from eft_serve.serve.names import pool_app_name

    cfg = cluster_stack["config"]
    serve.delete(pool_app_name("small_base"), _blocking=True)
    try:
        with EftClient(cluster_stack["address"], timeout=60) as client:
            with pytest.raises(grpc.RpcError) as err:
                # A prompt never seen before: no step of this request can come from the result cache.
                list(client.generate(f"Q: {time.time_ns()}", temperature=0, max_new_tokens=4))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "small_base" in err.value.details()
    finally:
        serve.run(
            pool_app({"role": "small_base", "pool": cfg.pools["small_base"].model_dump(mode="json")}),
            name=pool_app_name("small_base"),
            route_prefix=None,
        )
    with EftClient(cluster_stack["address"], timeout=120) as client:
        done = client.complete("Q: ", temperature=0, max_new_tokens=4)
    assert done.finish_reason in (eft_pb2.FINISH_REASON_LENGTH, eft_pb2.FINISH_REASON_EOS, eft_pb2.FINISH_REASON_STOP)


def test_demo_side_by_side_shows_upscaling(cluster_stack) -> None:
    import io

    from eft_serve.showcase import show_side_by_side

    out = io.StringIO()
    tally = show_side_by_side(cluster_stack["address"], cluster_stack["family"], n_prompts=4, out=out)
    # Up-scaling answers in the fine-tune's style and knows at least as much as the small fine-tune.
    assert tally["upscale"]["style_a"] == 4
    assert tally["upscale"]["fact"] >= tally["small_ft"]["fact"]
    assert "up-scaled (EFT)" in out.getvalue()


def test_cli_generate_json_last_line_has_ids_and_text(cluster_stack) -> None:
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "eft_serve.cli",
            "generate",
            "Q: What is the river of",
            "--address",
            cluster_stack["address"],
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["done"] and len(last["token_ids"]) == 6 and isinstance(last["text"], str)
    bad = subprocess.run(
        [sys.executable, "-m", "eft_serve.cli", "generate", "x", "--address", cluster_stack["address"], "--top-p", "7"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "top_p" in bad.stderr
