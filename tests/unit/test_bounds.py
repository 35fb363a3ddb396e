"""Request bounds (issue 11 item 3): every bad input is refused with the right status before any
pool is asked, messages quote user input only as a short prefix, and the sequence id that keys
pool KV caches is chosen by the server. Plus the pieces behind items 4 and 6 that need no I/O:
the retry budget, sibling cancellation, per-position candidates and signed cache values."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from eft_serve.cache.codec import BadMac, ExpectedShape, decode_checked, encode_result, sign, verify
from eft_serve.cache.keys import candidates_shape
from eft_serve.config import CoordinatorConfig, EftConfig, demo_config
from eft_serve.coordinator.fetch import gather_cancelling
from eft_serve.coordinator.request import GenerationRequest, MergeOptions
from eft_serve.coordinator.retry_budget import RetryBudget
from eft_serve.coordinator.validate import ModelLimits, RequestValidator, check_request_id
from eft_serve.engine.types import SequenceQuery
from eft_serve.errors import InvalidArgument, NotFound, PermissionDenied, Status, Unavailable, clip
from eft_serve.serve.app import GRPC_MAX_MESSAGE_ENV, proxy_env, proxy_request_timeout_s, serve_config
from eft_serve.testing.fake_engine import FakeEngine
from eft_serve.wire.pool_messages import queries_from_proto, queries_to_proto

from fakes import RECIPES, CharTokenizer

LONG = "Z" * 5000  # never to be echoed back whole


def validator(**cfg: object) -> RequestValidator:
    config = CoordinatorConfig(**{"max_new_tokens_cap": 64, "default_max_new_tokens": 16, **cfg})
    return RequestValidator(RECIPES, config, CharTokenizer(), ModelLimits(vocab_size=68, max_context=96))


def refused(fn, *args, **kwargs):
    with pytest.raises(Exception) as err:
        fn(*args, **kwargs)
    e = err.value
    assert len(e.message) < 300 and LONG[:60] not in e.message, e.message
    return e


@pytest.mark.parametrize(
    "request_id, ok",
    [("", True), ("req-1.a:b_C", True), ("x" * 128, True), ("x" * 129, False), ("a b", False), ("ü", False)],
)
def test_request_id_is_a_short_safe_id(request_id: str, ok: bool) -> None:
    if ok:
        assert check_request_id(request_id) == request_id
    else:
        assert refused(check_request_id, request_id).status is Status.INVALID_ARGUMENT


def test_sequence_id_is_server_chosen_whatever_the_request_id() -> None:
    v = validator()
    a = v.generation(GenerationRequest(prompt="hello", request_id="same"))
    b = v.generation(GenerationRequest(prompt="hello", request_id="same"))
    assert a.sequence_id != b.sequence_id and "same" not in a.sequence_id and len(a.sequence_id) >= 16
    e = refused(v.generation, GenerationRequest(prompt="hello", request_id=LONG + "!"))
    assert e.status is Status.INVALID_ARGUMENT and "request_id" in e.message


def test_prompt_byte_cap_is_checked_before_tokenizing() -> None:
    class CountingTokenizer(CharTokenizer):
        calls = 0

        def encode(self, text: str) -> list[int]:
            CountingTokenizer.calls += 1
            return super().encode(text)

    config = CoordinatorConfig(max_prompt_bytes=1000)
    v = RequestValidator(RECIPES, config, CountingTokenizer(), ModelLimits(vocab_size=68, max_context=96))
    e = refused(v.generation, GenerationRequest(prompt=LONG))
    assert e.status is Status.INVALID_ARGUMENT and "1000 bytes" in e.message
    # Multi-byte characters count in bytes: 400 characters of 3 bytes each are over 1000 bytes.
    refused(v.generation, GenerationRequest(prompt="€" * 400))
    assert CountingTokenizer.calls == 0
    refused(v.score, "a", "€" * 400, MergeOptions(), None)
    assert CountingTokenizer.calls == 0
    v.generation(GenerationRequest(prompt="€" * 300 + "abc"))  # 903 bytes: fine (then context-checked)
    assert CountingTokenizer.calls == 1


def test_stop_strings_bounded_in_count_and_length() -> None:
    v = validator(max_stop_strings=2, max_stop_string_chars=8)
    assert refused(v.generation, GenerationRequest(prompt="a", stop=("x", "y", "z"))).status is Status.INVALID_ARGUMENT
    e = refused(v.generation, GenerationRequest(prompt="a", stop=("ok", LONG)))
    assert e.status is Status.INVALID_ARGUMENT and "stop string 1" in e.message and "8" in e.message
    assert v.generation(GenerationRequest(prompt="a", stop=("12345678",))).sampling.stop == ("12345678",)


@pytest.mark.parametrize("timeout", [-1.0, math.nan, math.inf, -math.inf, 601.0, 1e300])
def test_bad_timeouts_are_invalid_everywhere(timeout: float) -> None:
    v = validator(max_timeout_s=600.0)
    assert refused(v.generation, GenerationRequest(prompt="a", timeout_s=timeout)).status is Status.INVALID_ARGUMENT
    assert refused(v.score, "a", "b", MergeOptions(), timeout).status is Status.INVALID_ARGUMENT


def test_timeout_default_and_cap() -> None:
    import time

    v = validator(default_timeout_s=5.0, max_timeout_s=600.0)
    assert v.generation(GenerationRequest(prompt="a")).deadline - time.time() == pytest.approx(5.0, abs=1)
    assert v.generation(GenerationRequest(prompt="a", timeout_s=600.0)).deadline - time.time() == pytest.approx(
        600.0, abs=1
    )
    with pytest.raises(ValueError, match="default_timeout_s"):
        CoordinatorConfig(default_timeout_s=700.0, max_timeout_s=600.0)


def test_exact_mode_gate() -> None:
    assert validator().merge_plan(MergeOptions(logprob_top_k=0)).logprob_top_k == 0
    e = refused(validator(allow_exact_mode=False).merge_plan, MergeOptions(logprob_top_k=0))
    assert e.status is Status.PERMISSION_DENIED and "logprob_top_k" in e.message
    assert isinstance(e, PermissionDenied)
    assert validator(allow_exact_mode=False).merge_plan(MergeOptions(logprob_top_k=5)).logprob_top_k == 5


def test_score_continuation_length_cap() -> None:
    v = validator(max_score_continuation_tokens=10)
    e = refused(v.score, "a", "b" * 11, MergeOptions(), None)
    assert e.status is Status.INVALID_ARGUMENT and "at most 10" in e.message
    assert len(v.score("a", "b" * 10, MergeOptions(), None).continuation_ids) == 10


def test_messages_quote_only_a_prefix_of_user_input() -> None:
    v = validator()
    e = refused(v.merge_plan, MergeOptions(recipe=LONG))
    assert isinstance(e, NotFound) and "upscale" in e.message
    e = refused(v.merge_plan, MergeOptions(expert_weights={LONG: 1.0}))
    assert isinstance(e, InvalidArgument)
    assert len(clip(LONG)) <= 40 and clip("abc") == "'abc'"


def test_proxy_bounds_in_the_serve_config() -> None:
    cfg = demo_config()
    grpc_options = serve_config(cfg)["grpc_options"]
    assert grpc_options["request_timeout_s"] == proxy_request_timeout_s(cfg) > cfg.coordinator.max_timeout_s
    data = cfg.model_dump()
    data["grpc"]["request_timeout_s"] = 42.0
    data["grpc"]["max_message_bytes"] = 65536
    custom = EftConfig.model_validate(data)
    assert serve_config(custom)["grpc_options"]["request_timeout_s"] == 42.0
    assert proxy_env(custom) == {GRPC_MAX_MESSAGE_ENV: "65536"}


def test_retry_budget_allows_a_fraction_of_calls_plus_a_reserve() -> None:
    budget = RetryBudget(ratio=0.1, reserve=3)
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]
    for _ in range(10):
        budget.record_call()
    assert budget.try_retry() and not budget.try_retry()
    assert budget.retries == 4 and budget.denied == 2
    assert not RetryBudget(ratio=0.0, reserve=0).try_retry()


async def _slow(name: str, cancelled: list[str]) -> str:
    """A pool call that takes 30 s unless cancelled (then it records its name)."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        cancelled.append(name)
        raise
    return name


async def test_one_failure_cancels_the_sibling_calls() -> None:
    cancelled: list[str] = []

    async def failing() -> str:
        await asyncio.sleep(0.01)
        raise Unavailable("pool 'b' is down")

    started = asyncio.get_running_loop().time()
    with pytest.raises(Unavailable, match="pool 'b'"):
        await gather_cancelling({"a": _slow("a", cancelled), "b": failing(), "c": _slow("c", cancelled)})
    assert sorted(cancelled) == ["a", "c"] and asyncio.get_running_loop().time() - started < 5
    assert await gather_cancelling({"x": asyncio.sleep(0, "x"), "y": asyncio.sleep(0, "y")}) == {"x": "x", "y": "y"}


async def test_cancelling_the_step_cancels_its_calls() -> None:
    cancelled: list[str] = []

    step = asyncio.ensure_future(gather_cancelling({"a": _slow("a", cancelled), "b": _slow("b", cancelled)}))
    await asyncio.sleep(0.05)
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step
    assert sorted(cancelled) == ["a", "b"]


def test_per_position_candidates_answer_only_what_each_position_asked() -> None:
    engine = FakeEngine(50, seed=3)
    ids = [1, 2, 3, 4, 5]
    whole = engine.next_token_logprobs([SequenceQuery(ids, num_positions=3, candidate_ids=[7, 8, 9])], 0)[0]
    per = engine.next_token_logprobs(
        [SequenceQuery(ids, num_positions=3, position_candidate_ids=[[7], [8, 9], []])], 0
    )[0]
    assert [len(p.candidate_logprobs) for p in per.positions] == [1, 2, 0]
    assert per.positions[0].candidate_logprobs[0] == whole.positions[0].candidate_logprobs[0]
    np.testing.assert_array_equal(per.positions[1].candidate_logprobs, whole.positions[1].candidate_logprobs[1:])
    with pytest.raises(ValueError, match="one list per position"):
        engine.next_token_logprobs([SequenceQuery(ids, num_positions=3, position_candidate_ids=[[7]])], 5)
    with pytest.raises(ValueError, match="not both"):
        engine.next_token_logprobs([SequenceQuery(ids, 1, candidate_ids=[1], position_candidate_ids=[[7]])], 5)
    with pytest.raises(ValueError, match="outside"):
        engine.next_token_logprobs([SequenceQuery(ids, 1, position_candidate_ids=[[50]])], 5)
    # The wire carries them; the cache key tells different splits apart.
    q = SequenceQuery(ids, num_positions=2, position_candidate_ids=[[7], [8, 9]], sequence_id="s")
    assert queries_from_proto(queries_to_proto([q], 5, None))[0].position_candidate_ids == [[7], [8, 9]]
    assert candidates_shape(5, [], 2, [[7], [8, 9]]) != candidates_shape(5, [], 2, [[7, 8], [9]])
    assert candidates_shape(5, [], 2, [[7], [8, 9]]) != candidates_shape(5, [], 2)


def test_signed_values_verify_only_under_their_own_key() -> None:
    engine = FakeEngine(50, seed=3)
    result = engine.next_token_logprobs([SequenceQuery([1, 2], num_positions=1)], 5)[0]
    payload = encode_result(result)
    signed = sign(b"k1", "eft:v1:a", payload)
    assert verify(b"k1", "eft:v1:a", signed) == payload
    shape = ExpectedShape(num_positions=1, num_candidates=0, logprob_top_k=5, vocab_size=50)
    assert decode_checked(verify(b"k1", "eft:v1:a", signed), shape).positions[0].top_ids.tolist() == (
        result.positions[0].top_ids.tolist()
    )
    tampered = bytearray(signed)
    tampered[-1] ^= 1
    for key, cache_key, raw in [
        (b"k2", "eft:v1:a", signed),  # another secret
        (b"k1", "eft:v1:b", signed),  # moved under another key
        (b"k1", "eft:v1:a", bytes(tampered)),  # one bit flipped
        (b"k1", "eft:v1:a", payload),  # unsigned
        (b"k1", "eft:v1:a", b"short"),
    ]:
        with pytest.raises(BadMac):
            verify(key, cache_key, raw)
