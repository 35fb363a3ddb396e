"""The coordinator over in-process fake-engine pools: exactness, sampling, stops, errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from eft_serve.coordinator.request import GenerationRequest, MergeOptions
from eft_serve.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PoolUnreachable,
    Unavailable,
)
from eft_serve.testing.fake_engine import FakeEngine
from eft_serve.transport.inprocess import InProcessPool

from fakes import EOS, VOCAB, CharTokenizer, fake_coordinator, fake_engines


async def collect(coord, req: GenerationRequest):
    stream = await coord.generate(req)
    chunks = [c async for c in stream]
    ids = [t.token_id for c in chunks for t in c.tokens]
    return "".join(c.text for c in chunks), ids, chunks


def reference_greedy(engines, coefs: dict[str, float], prompt: list[int], n: int) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(n):
        score = sum(c * engines[r].logprobs(ids).astype(np.float64) for r, c in coefs.items())
        tok = int(np.argmax(score))
        out.append(tok)
        if tok == EOS:
            break
        ids.append(tok)
    return out


async def test_exact_greedy_matches_full_vocab_reference() -> None:
    engines = fake_engines()
    coord = fake_coordinator(engines)
    await coord.start()
    req = GenerationRequest(
        prompt="hello world",
        merge=MergeOptions(logprob_top_k=0, beta=1.5),
        temperature=0,
        max_new_tokens=24,
        ignore_eos=False,
    )
    _, ids, chunks = await collect(coord, req)
    expected = reference_greedy(
        engines, {"large_base": 1, "small_ft": 1.5, "small_base": -1.5}, CharTokenizer().encode("hello world"), 24
    )
    assert ids == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(ids)


async def test_seed_reproducible_and_streamed_text_equals_decode() -> None:
    coord = fake_coordinator()
    await coord.start()
    req = GenerationRequest(prompt="abc", temperature=1.0, seed=7, max_new_tokens=20, ignore_eos=True)
    text1, ids1, _ = await collect(coord, req)
    text2, ids2, _ = await collect(coord, req)
    assert (text1, ids1) == (text2, ids2)
    assert text1 == CharTokenizer().decode(ids1)
    _, ids3, _ = await collect(
        coord, GenerationRequest(prompt="abc", temperature=1.0, seed=8, max_new_tokens=20, ignore_eos=True)
    )
    assert ids3 != ids1


async def test_logprobs_and_model_logprobs() -> None:
    engines = fake_engines()
    coord = fake_coordinator(engines)
    await coord.start()
    req = GenerationRequest(
        prompt="xy",
        merge=MergeOptions(logprob_top_k=0),
        temperature=0,
        max_new_tokens=3,
        return_logprobs=True,
        return_model_logprobs=True,
        ignore_eos=True,
    )
    _, ids, chunks = await collect(coord, req)
    first = chunks[0].tokens[0]
    prompt = CharTokenizer().encode("xy")
    for role in ("large_base", "small_ft", "small_base"):
        assert first.model_logprobs[role] == pytest.approx(float(engines[role].logprobs(prompt)[ids[0]]), abs=1e-5)
    assert first.logprob is not None and first.logprob <= 0


async def test_max_new_tokens_and_stop_strings() -> None:
    coord = fake_coordinator()
    await coord.start()
    text, ids, chunks = await collect(
        coord, GenerationRequest(prompt="ab", temperature=0, max_new_tokens=10, ignore_eos=True)
    )
    assert len(ids) == 10 and chunks[-1].finish_reason == "length"
    stop = text[3:5]
    text2, _, chunks2 = await collect(
        coord, GenerationRequest(prompt="ab", temperature=0, max_new_tokens=10, ignore_eos=True, stop=(stop,))
    )
    assert chunks2[-1].finish_reason == "stop"
    assert text2 == text[: text.index(stop)]


async def test_eos_finishes() -> None:
    table = np.full((VOCAB, VOCAB), -5.0)
    table[:, EOS] = 5.0
    eos_engine = FakeEngine(VOCAB, table=table, eos_token_id=EOS, name="eosy", max_context=96)
    coord = fake_coordinator(fake_engines(large_base=eos_engine))
    await coord.start()
    text, ids, chunks = await collect(
        coord, GenerationRequest(prompt="ab", merge=MergeOptions(recipe="large_base"), temperature=0)
    )
    assert ids == [EOS] and chunks[-1].finish_reason == "eos" and text == ""


@pytest.mark.parametrize(
    "req, match",
    [
        (GenerationRequest(prompt=""), "empty"),
        (GenerationRequest(prompt="a" * 200), "context length"),
        (GenerationRequest(prompt="a", merge=MergeOptions(beta=float("inf"))), "finite"),
        (
            GenerationRequest(
                prompt="a", merge=MergeOptions(recipe="interpolate", expert_weights={"small_ft_b": float("nan")})
            ),
            "finite",
        ),
        (GenerationRequest(prompt="a", temperature=-0.5), "temperature"),
        (GenerationRequest(prompt="a", top_p=0.0), "top_p"),
        (GenerationRequest(prompt="a", top_p=1.01), "top_p"),
        (GenerationRequest(prompt="a", max_new_tokens=0), "max_new_tokens"),
        (GenerationRequest(prompt="a", max_new_tokens=65), "cap"),
        (GenerationRequest(prompt="a", merge=MergeOptions(logprob_top_k=10_000)), "logprob_top_k"),
    ],
)
async def test_bad_input_is_invalid_argument(req: GenerationRequest, match: str) -> None:
    coord = fake_coordinator()
    await coord.start()
    with pytest.raises(InvalidArgument, match=match):
        await coord.generate(req)


@pytest.mark.parametrize("call", ["generate", "score"])
async def test_unknown_recipe_is_not_found_on_every_path(call: str) -> None:
    # One status for one mistake: the named recipe does not exist (NOT_FOUND), generate or score.
    coord = fake_coordinator()
    await coord.start()
    with pytest.raises(NotFound, match="unknown recipe 'nope'; available recipes: .*upscale"):
        if call == "generate":
            await coord.generate(GenerationRequest(prompt="a", merge=MergeOptions(recipe="nope")))
        else:
            await coord.score("a", "b", MergeOptions(recipe="nope"))


async def test_vocabulary_mismatch_refused_naming_pools() -> None:
    other = FakeEngine(VOCAB, seed=9, name="alien", vocab_fingerprint="different", eos_token_id=EOS)
    coord = fake_coordinator(fake_engines(small_ft=other))
    with pytest.raises(FailedPrecondition, match="small_ft.*alien"):
        await coord.start()


class HangingPool(InProcessPool):
    async def next_token_logprobs(self, queries, logprob_top_k, deadline=None):
        await asyncio.sleep(3600)


async def test_pool_down_is_unavailable_not_a_hang() -> None:
    coord = fake_coordinator(pool_call_timeout_s=0.5)
    await coord.start()
    coord._pools["small_base"] = HangingPool(fake_engines()["small_base"], "small_base")
    with pytest.raises(Unavailable, match="small_base"):
        await collect(coord, GenerationRequest(prompt="ab", temperature=0, max_new_tokens=3))


async def test_deadline_exceeded() -> None:
    coord = fake_coordinator()
    await coord.start()
    coord._pools["small_base"] = HangingPool(fake_engines()["small_base"], "small_base")
    with pytest.raises(DeadlineExceeded):
        await collect(coord, GenerationRequest(prompt="ab", temperature=0, max_new_tokens=3, timeout_s=0.3))


async def test_score_matches_sum_of_merged_logprobs() -> None:
    engines = fake_engines()
    coord = fake_coordinator(engines)
    await coord.start()
    res = await coord.score("hello", " there", MergeOptions(logprob_top_k=0))
    tok = CharTokenizer()
    ids = tok.encode("hello")
    total = 0.0
    for t in tok.encode(" there"):
        score = sum(
            c * engines[r].logprobs(ids).astype(np.float64)
            for r, c in {"large_base": 1, "small_ft": 1, "small_base": -1}.items()
        )
        score -= np.log(np.exp(score - score.max()).sum()) + score.max()
        total += score[t]
        ids.append(t)
    assert res.total_logprob == pytest.approx(total, abs=1e-4)
    # Top-k mode with candidates is exact for the scored tokens too.
    res_k = await coord.score("hello", " there", MergeOptions(logprob_top_k=5))
    assert len(res_k.tokens) == len(res.tokens)


class FlakyPool(InProcessPool):
    """Fails the first `failures` calls as a lost replica would, then serves."""

    def __init__(self, engine, role, failures: int) -> None:
        super().__init__(engine, role)
        self.failures = failures

    async def next_token_logprobs(self, queries, logprob_top_k, deadline=None):
        if self.failures > 0:
            self.failures -= 1
            raise PoolUnreachable(f"model pool {self.role!r} lost a replica")  # connection-level: retried
        return await super().next_token_logprobs(queries, logprob_top_k, deadline)


async def test_lost_replica_costs_a_retry_not_the_request() -> None:
    engines = fake_engines()
    plain = fake_coordinator(fake_engines())
    await plain.start()
    expected = await collect(plain, GenerationRequest(prompt="ab", temperature=0, max_new_tokens=6, ignore_eos=True))
    coord = fake_coordinator(engines, pool_call_retries=2)
    await coord.start()
    coord._pools["large_base"] = FlakyPool(engines["large_base"], "large_base", failures=2)
    got = await collect(coord, GenerationRequest(prompt="ab", temperature=0, max_new_tokens=6, ignore_eos=True))
    assert got[1] == expected[1]
    coord._pools["large_base"].failures = 3  # more failures than retries: UNAVAILABLE, not a hang
    with pytest.raises(Unavailable):
        await collect(coord, GenerationRequest(prompt="ba", temperature=0, max_new_tokens=6, ignore_eos=True))
