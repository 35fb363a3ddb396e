"""Speculative decoding through the coordinator (in-process fake-engine pools).

The coupled acceptance rule promises output identical to plain decoding — greedy and seeded
sampling, exact and top-k merges, conservative decoding — with EOS, stop strings and the token
budget landing inside a block exactly where plain decoding ends. These tests hold it to that,
and check the acceptance counters, the block sizes and the pool traffic it saves.
"""

from __future__ import annotations

import numpy as np
import pytest

from eft_serve.coordinator.request import GenerationRequest, MergeOptions, SpeculativeOptions
from eft_serve.engine.types import DraftQuery, SequenceQuery
from eft_serve.errors import InvalidArgument, Unavailable
from eft_serve.testing.fake_engine import FakeEngine
from eft_serve.transport.inprocess import InProcessPool

from fakes import EOS, VOCAB, fake_coordinator, fake_engines

PROMPTS = ["hello world", "abc", "The quick brown fox", "zz top 42"]


async def run(coord, req: GenerationRequest):
    stream = await coord.generate(req)
    chunks = [c async for c in stream]
    ids = [t.token_id for c in chunks for t in c.tokens]
    return "".join(c.text for c in chunks), ids, chunks[-1]


def agreeable_engines(**overrides: FakeEngine) -> dict[str, FakeEngine]:
    """small_base == large_base, so the up-scaled model *is* small_ft: every greedy draft holds."""
    same = dict(seed=1, eos_token_id=EOS, max_context=96)
    engines = fake_engines(
        large_base=FakeEngine(VOCAB, name="large_base", **same),
        small_base=FakeEngine(VOCAB, name="small_base", **same),
    )
    engines.update(overrides)
    return engines


def spec(enabled: bool = True, k: int | None = None, adaptive: bool | None = None) -> SpeculativeOptions:
    return SpeculativeOptions(enabled=enabled, max_draft_tokens=k, adaptive=adaptive)


@pytest.mark.parametrize("logprob_top_k", [0, 20, 3])
@pytest.mark.parametrize("k", [1, 3, 8])
async def test_greedy_speculative_equals_plain(logprob_top_k: int, k: int) -> None:
    coord = fake_coordinator()
    await coord.start()
    for prompt in PROMPTS:
        base = dict(prompt=prompt, merge=MergeOptions(logprob_top_k=logprob_top_k), temperature=0.0, max_new_tokens=24)
        plain = await run(coord, GenerationRequest(**base, speculative=spec(False)))
        fast = await run(coord, GenerationRequest(**base, speculative=spec(True, k, adaptive=False)))
        assert fast[:2] == plain[:2]
        assert fast[2].finish_reason == plain[2].finish_reason
        assert fast[2].usage.speculation.speculative_blocks > 0
        assert plain[2].usage.speculation.speculative_blocks == 0


@pytest.mark.parametrize("conservative", [False, True])
async def test_seeded_sampling_speculative_is_identical_per_seed(conservative: bool) -> None:
    coord = fake_coordinator()
    await coord.start()
    for seed in range(12):
        base = dict(
            prompt=PROMPTS[seed % len(PROMPTS)],
            merge=MergeOptions(conservative=conservative, beta=1.3),
            temperature=0.9,
            top_p=0.95,
            top_k=30,
            seed=seed,
            max_new_tokens=20,
        )
        plain = await run(coord, GenerationRequest(**base))
        fast = await run(coord, GenerationRequest(**base, speculative=spec(True, 4)))
        assert fast[:2] == plain[:2], f"seed {seed}"


async def test_agreeing_drafter_is_fully_accepted_with_fewer_pool_calls() -> None:
    coord = fake_coordinator(agreeable_engines())
    await coord.start()
    base = dict(
        prompt="hello", merge=MergeOptions(logprob_top_k=0), temperature=0.0, max_new_tokens=33, ignore_eos=True
    )
    plain = await run(coord, GenerationRequest(**base))
    fast = await run(coord, GenerationRequest(**base, speculative=spec(True, 8, adaptive=False)))
    assert fast[:2] == plain[:2]
    s = fast[2].usage.speculation
    # The first token is a plain step (it prefills every pool), then blocks of 8 drafts + 1 own
    # token: 3 full blocks (27), then 5 left -> 4 drafted + 1.
    assert (s.speculative_blocks, s.drafted_tokens, s.accepted_tokens, s.fallbacks) == (4, 28, 28, 0)
    assert s.mean_accepted_length == pytest.approx(28 / 4)
    # Per block: one draft call (small_ft drafts *and* scores its draft) + one call to each of the
    # two other recipe pools — instead of one call per pool per token.
    assert fast[2].usage.fetch.pool_calls == 3 + 4 * 3
    assert plain[2].usage.fetch.pool_calls == 33 * 3


async def test_adaptive_blocks_grow_while_drafts_hold() -> None:
    coord = fake_coordinator(agreeable_engines())
    await coord.start()
    req = GenerationRequest(
        prompt="hello", temperature=0.0, max_new_tokens=40, ignore_eos=True, speculative=spec(True, 8, adaptive=True)
    )
    _, ids, last = await run(coord, req)
    # Two plain steps (the first prefills, the second measures what plain costs), then blocks of 4,
    # then 8 (doubled, capped), each plus the merged model's own token: 2 + 5 + 9 + 9 + 9 = 34
    # tokens, then 6 left -> 5 drafted + 1 = 40. Drafts that always hold never fall back.
    s = last.usage.speculation
    assert len(ids) == 40 and s.drafted_tokens == s.accepted_tokens == 4 + 8 + 8 + 8 + 5
    assert s.speculative_blocks == 5 and s.fallbacks == 0


async def test_first_token_is_a_plain_step_before_any_draft() -> None:
    # The first token must not wait for a draft and its verification: it comes from the same
    # one-position pool calls plain decoding makes (which also prefill the prompt).
    engines = agreeable_engines()
    coord = fake_coordinator(engines)
    await coord.start()
    for adaptive in (True, False):
        req = GenerationRequest(
            prompt="hello", temperature=0.0, max_new_tokens=20, ignore_eos=True, speculative=spec(True, 8, adaptive)
        )
        drafts_before = engines["small_ft"].num_draft_calls
        stream = await coord.generate(req)
        first = await anext(aiter(stream))
        assert len(first.tokens) == 1 and engines["small_ft"].num_draft_calls == drafts_before
        rest = [c async for c in stream]
        assert rest[-1].usage.speculation.speculative_blocks > 0  # ... and speculation starts after it


def contrarian_engines() -> dict[str, FakeEngine]:
    """An extra drafter pool ("contrarian") that models something else: its drafts almost never hold.

    Every pool takes a few ms per call, so a draft + verify clearly costs more than a plain step
    whatever the machine's load."""
    slow = dict(eos_token_id=EOS, max_context=96, delay_s=0.003)
    return {
        "large_base": FakeEngine(VOCAB, seed=1, name="large_base", **slow),
        "small_base": FakeEngine(VOCAB, seed=2, name="small_base", **slow),
        "small_ft": FakeEngine(VOCAB, seed=3, name="small_ft", **slow),
        "contrarian": FakeEngine(VOCAB, seed=99, name="contrarian", **slow),
    }


async def test_a_drafter_that_keeps_losing_falls_back_to_plain_and_probes_again() -> None:
    coord = fake_coordinator(contrarian_engines(), speculative={"drafter": "contrarian"})
    await coord.start()
    base = dict(prompt="hello", temperature=0.0, max_new_tokens=60, ignore_eos=True)
    plain = await run(coord, GenerationRequest(**base))
    fast = await run(coord, GenerationRequest(**base, speculative=spec(True, 8, adaptive=True)))
    assert fast[:2] == plain[:2]  # still token-for-token plain decoding
    s = fast[2].usage.speculation
    assert s.accepted_tokens <= s.drafted_tokens // 4  # the drafter really disagrees
    # Two blocks of evidence, then plain steps with probes at growing intervals (4, 8, 16, ...):
    # a handful of blocks in 60 tokens, and more than the first two (the probes happened).
    assert s.fallbacks >= 2 and 3 <= s.speculative_blocks <= 8, s
    # Fixed blocks (adaptive off) never fall back: they draft on every step after the first.
    fixed = await run(coord, GenerationRequest(**base, speculative=spec(True, 2, adaptive=False)))
    assert fixed[:2] == plain[:2]
    assert fixed[2].usage.speculation.fallbacks == 0 and fixed[2].usage.speculation.speculative_blocks >= 20


async def test_a_drafter_that_agrees_stays_speculative() -> None:
    slow = dict(seed=1, eos_token_id=EOS, max_context=96, delay_s=0.003)
    engines = agreeable_engines(
        large_base=FakeEngine(VOCAB, name="large_base", **slow), small_base=FakeEngine(VOCAB, name="small_base", **slow)
    )
    coord = fake_coordinator(engines)
    await coord.start()
    base = dict(prompt="abc", temperature=0.0, max_new_tokens=60, ignore_eos=True)
    plain = await run(coord, GenerationRequest(**base))
    fast = await run(coord, GenerationRequest(**base, speculative=spec(True, 8, adaptive=True)))
    assert fast[:2] == plain[:2]
    s = fast[2].usage.speculation
    assert s.fallbacks == 0 and s.accepted_tokens == s.drafted_tokens
    # 2 plain steps, then 4 + 1, then blocks of 8 + 1 to the end: every token after the second
    # came from a block.
    assert s.accepted_tokens + s.speculative_blocks == 60 - 2


async def test_eos_inside_a_block_ends_the_stream_where_plain_decoding_does() -> None:
    table = np.zeros((VOCAB, VOCAB), dtype=np.float32)
    for t in range(VOCAB):
        table[t, (t + 1) % VOCAB] = 6.0  # a walk up the alphabet ...
    table[5, EOS] = 9.0  # ... that stops after token 5
    walker = dict(table=table, eos_token_id=EOS, max_context=96)
    engines = fake_engines(
        large_base=FakeEngine(VOCAB, name="large_base", **walker),
        small_base=FakeEngine(VOCAB, name="small_base", **walker),
        small_ft=FakeEngine(VOCAB, name="small_ft", **walker),
    )
    coord = fake_coordinator(engines)
    await coord.start()
    base = dict(prompt="b", temperature=0.0, max_new_tokens=30)
    plain = await run(coord, GenerationRequest(**base))
    fast = await run(coord, GenerationRequest(**base, speculative=spec(True, 8, adaptive=False)))
    assert plain[1][-1] == EOS and plain[2].finish_reason == "eos"
    assert fast[:2] == plain[:2] and fast[2].finish_reason == "eos"
    assert fast[2].usage.completion_tokens == plain[2].usage.completion_tokens == len(plain[1])


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 9])
async def test_token_budget_inside_a_block(max_new_tokens: int) -> None:
    coord = fake_coordinator(agreeable_engines())
    await coord.start()
    base = dict(prompt="hello", temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)
    plain = await run(coord, GenerationRequest(**base))
    fast = await run(coord, GenerationRequest(**base, speculative=spec(True, 8, adaptive=False)))
    assert fast[:2] == plain[:2] and len(fast[1]) == max_new_tokens
    assert fast[2].finish_reason == "length"


async def test_stop_string_inside_a_block_streams_nothing_past_it() -> None:
    coord = fake_coordinator(agreeable_engines())
    await coord.start()
    base = dict(prompt="hello", temperature=0.0, max_new_tokens=40, ignore_eos=True)
    free_text, _, _ = await run(coord, GenerationRequest(**base))
    stop = free_text[5:7]  # lands inside the first 8-token block
    assert stop and stop in free_text
    plain = await run(coord, GenerationRequest(**base, stop=(stop,)))
    fast = await run(coord, GenerationRequest(**base, stop=(stop,), speculative=spec(True, 8, adaptive=False)))
    assert fast[:2] == plain[:2] and fast[2].finish_reason == plain[2].finish_reason == "stop"
    assert stop not in fast[0] and fast[0] == free_text[: free_text.index(stop)]


async def test_context_limit_caps_the_block() -> None:
    coord = fake_coordinator(agreeable_engines())
    await coord.start()
    base = dict(prompt="a" * 90, temperature=0.0, max_new_tokens=30, ignore_eos=True)
    plain = await run(coord, GenerationRequest(**base))
    fast = await run(coord, GenerationRequest(**base, speculative=spec(True, 8, adaptive=False)))
    assert fast[:2] == plain[:2] and fast[2].finish_reason == plain[2].finish_reason == "context"


async def test_single_model_recipe_decodes_plainly() -> None:
    coord = fake_coordinator()
    await coord.start()
    req = GenerationRequest(prompt="abc", merge=MergeOptions(recipe="large_base"), temperature=0.0, speculative=spec())
    _, _, last = await run(coord, req)
    assert last.usage.speculation.speculative_blocks == 0  # nothing to draft with


async def test_rejection_rule_keeps_greedy_output_and_runs_sampled() -> None:
    coord = fake_coordinator(speculative={"enabled": True, "acceptance": "rejection", "adaptive": False})
    await coord.start()
    plain = await run(coord, GenerationRequest(prompt="abc", temperature=0.0, speculative=spec(False)))
    fast = await run(coord, GenerationRequest(prompt="abc", temperature=0.0))
    assert fast[:2] == plain[:2] and fast[2].usage.speculation.speculative_blocks > 0
    sampled = await run(coord, GenerationRequest(prompt="abc", temperature=1.0, seed=5, max_new_tokens=12))
    again = await run(coord, GenerationRequest(prompt="abc", temperature=1.0, seed=5, max_new_tokens=12))
    # Reproducible per seed, and really decoded in blocks (the distribution is tested in core).
    assert sampled[:2] == again[:2] and sampled[2].usage.speculation.speculative_blocks > 0


async def test_server_default_and_request_override() -> None:
    coord = fake_coordinator(speculative={"enabled": True, "max_draft_tokens": 4})
    await coord.start()
    _, _, on = await run(coord, GenerationRequest(prompt="abc", temperature=0.0))
    _, _, off = await run(coord, GenerationRequest(prompt="abc", temperature=0.0, speculative=spec(False)))
    assert on.usage.speculation.speculative_blocks > 0 and off.usage.speculation.speculative_blocks == 0
    with pytest.raises(InvalidArgument, match=r"max_draft_tokens must be in \[1, 4\]"):
        await coord.generate(GenerationRequest(prompt="abc", speculative=spec(True, 5)))


async def test_drafter_down_is_unavailable_naming_it() -> None:
    coord = fake_coordinator(pool_call_timeout_s=0.3, pool_call_retries=0)
    await coord.start()

    async def broken(queries, deadline, score_logprob_top_k=None):
        raise Unavailable("model pool 'small_ft' is unavailable: RayActorError")

    coord._pools["small_ft"].draft = broken
    with pytest.raises(Unavailable, match="small_ft"):
        await run(coord, GenerationRequest(prompt="abc", temperature=0.0, speculative=spec()))


@pytest.mark.parametrize("logprob_top_k", [0, 5])
async def test_drafter_scores_its_draft_exactly_as_a_verification_call_would(logprob_top_k: int) -> None:
    # The drafter's scores replace its verification call, so they must be what that call returns.
    engine = fake_engines()["small_ft"]
    pool = InProcessPool(engine, "small_ft")
    prefix = [3, 1, 4, 1, 5]
    (drafted,) = await pool.draft([DraftQuery(prefix, 4, "s")], None, score_logprob_top_k=logprob_top_k)
    (plain,) = await pool.draft([DraftQuery(prefix, 4, "s")], None)
    assert drafted.token_ids == plain.token_ids and plain.scores is None and drafted.scores is not None
    (expected,) = await pool.next_token_logprobs(
        [SequenceQuery(prefix + drafted.token_ids, num_positions=5)], logprob_top_k
    )
    assert len(drafted.scores.positions) == 5
    for got, want in zip(drafted.scores.positions, expected.positions):
        assert np.array_equal(got.top_ids, want.top_ids)
        assert np.allclose(got.top_logprobs, want.top_logprobs)
        assert (got.full_logprobs is None) == (want.full_logprobs is None)
        if want.full_logprobs is not None:
            assert np.allclose(got.full_logprobs, want.full_logprobs)
