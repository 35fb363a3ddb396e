"""Top-logprob alternatives through the coordinator (in-process fake-engine pools).

Every generated token carries the n most likely tokens of the merged (EFT) distribution it was
chosen from: checked against an independent full-vocabulary merge, for greedy order, bounds and
validation, and for speculative decoding reporting exactly what plain decoding does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from eft_serve.coordinator.request import GenerationRequest, MergeOptions, SpeculativeOptions, TokenOutput
from eft_serve.errors import InvalidArgument

from fakes import CHARS, EOS, VOCAB, CharTokenizer, fake_coordinator, fake_engines

PROMPTS = ["hello world", "abc", "The quick brown fox", "zz top 42"]


async def tokens_of(coord, req: GenerationRequest) -> list[TokenOutput]:
    stream = await coord.generate(req)
    return [t async for c in stream for t in c.tokens]


def _alts(t: TokenOutput) -> list[tuple[int, float]]:
    return [(a.token_id, a.logprob) for a in t.top_logprobs]


async def test_exact_alternatives_are_the_merged_distributions_top_n() -> None:
    engines = fake_engines()
    coord = fake_coordinator(engines)
    await coord.start()
    n = 5
    req = GenerationRequest(
        prompt="hello world",
        merge=MergeOptions(logprob_top_k=0, beta=1.5),
        temperature=0,
        max_new_tokens=16,
        top_logprobs=n,
    )
    tokens = await tokens_of(coord, req)
    assert tokens
    prefix = CharTokenizer().encode("hello world")
    coefs = {"large_base": 1.0, "small_ft": 1.5, "small_base": -1.5}
    for t in tokens:
        # An independent merge over the whole vocabulary (the paper's formula, renormalised).
        score = sum(c * engines[r].logprobs(prefix).astype(np.float64) for r, c in coefs.items())
        ref = score - (np.max(score) + np.log(np.sum(np.exp(score - np.max(score)))))
        expected = sorted(range(VOCAB), key=lambda i: (-ref[i], i))[:n]
        assert [a.token_id for a in t.top_logprobs] == expected
        assert [a.logprob for a in t.top_logprobs] == pytest.approx([ref[i] for i in expected], abs=1e-4)
        # Greedy: the chosen token is the most likely alternative, with the same logprob.
        assert t.top_logprobs[0].token_id == t.token_id
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        # Each alternative's text is that token decoded alone.
        assert all(a.text == ("" if a.token_id == EOS else CHARS[a.token_id]) for a in t.top_logprobs)
        prefix.append(t.token_id)


@pytest.mark.parametrize("logprob_top_k", [0, 20, 4])
async def test_alternatives_descending_bounded_and_n_respected(logprob_top_k: int) -> None:
    coord = fake_coordinator()
    await coord.start()
    for n in (1, 3, 20):
        for prompt in PROMPTS:
            req = GenerationRequest(
                prompt=prompt,
                merge=MergeOptions(logprob_top_k=logprob_top_k),
                temperature=0,
                max_new_tokens=12,
                top_logprobs=n,
            )
            tokens = await tokens_of(coord, req)
            for t in tokens:
                alts = _alts(t)
                if logprob_top_k == 0:
                    assert len(alts) == n
                else:  # only the merged support (the union of the 3 models' top-k) can appear
                    assert min(n, logprob_top_k) <= len(alts) <= min(n, 3 * logprob_top_k)
                assert len(alts) >= 1 and len({i for i, _ in alts}) == len(alts)
                lps = [lp for _, lp in alts]
                assert lps == sorted(lps, reverse=True)
                assert all(lp <= 0 for lp in lps)
                assert math.fsum(math.exp(lp) for lp in lps) <= 1 + 1e-6
                assert alts[0][0] == t.token_id  # greedy
                assert t.logprob is not None  # top_logprobs > 0 implies return_logprobs
    # In exact mode n = 20 is always 20 alternatives (the vocabulary has 68).
    exact = await tokens_of(
        coord,
        GenerationRequest(prompt="abc", merge=MergeOptions(logprob_top_k=0), max_new_tokens=6, top_logprobs=20, seed=3),
    )
    assert all(len(t.top_logprobs) == 20 for t in exact)
    # top-k mode with a small k: fewer than asked, the support is smaller than n.
    narrow = await tokens_of(
        coord,
        GenerationRequest(prompt="abc", merge=MergeOptions(logprob_top_k=2), max_new_tokens=6, top_logprobs=20, seed=3),
    )
    assert all(1 <= len(t.top_logprobs) <= 6 for t in narrow)


async def test_sampled_token_is_among_the_support_and_off_by_default() -> None:
    coord = fake_coordinator()
    await coord.start()
    plain = await tokens_of(coord, GenerationRequest(prompt="abc", max_new_tokens=8, seed=1))
    assert all(t.top_logprobs == [] and t.logprob is None for t in plain)
    sampled = await tokens_of(
        coord, GenerationRequest(prompt="abc", max_new_tokens=16, seed=1, temperature=1.0, top_logprobs=20)
    )
    for t in sampled:
        alts = dict(_alts(t))
        if t.token_id in alts:  # the sampled token, when listed, has its own logprob
            assert alts[t.token_id] == pytest.approx(t.logprob)
        else:  # otherwise it is less likely than every listed alternative
            assert t.logprob <= min(alts.values()) + 1e-9


@pytest.mark.parametrize("n", [-1, 21, 1000])
async def test_out_of_range_is_invalid_argument_naming_the_field(n: int) -> None:
    coord = fake_coordinator()
    await coord.start()
    with pytest.raises(InvalidArgument, match=r"top_logprobs must be in \[0, 20\]"):
        await coord.generate(GenerationRequest(prompt="abc", top_logprobs=n))
    # The cap is the server's: a lower max_top_logprobs refuses what the default allows.
    low = fake_coordinator(max_top_logprobs=2)
    await low.start()
    with pytest.raises(InvalidArgument, match=r"top_logprobs must be in \[0, 2\]"):
        await low.generate(GenerationRequest(prompt="abc", top_logprobs=3))


@pytest.mark.parametrize("logprob_top_k", [0, 20, 3])
@pytest.mark.parametrize("sampled", [False, True])
async def test_speculative_reports_the_same_alternatives_as_plain(logprob_top_k: int, sampled: bool) -> None:
    coord = fake_coordinator()
    await coord.start()
    blocks = 0
    for i, prompt in enumerate(PROMPTS):
        base = dict(
            prompt=prompt,
            merge=MergeOptions(logprob_top_k=logprob_top_k, beta=1.2),
            temperature=0.8 if sampled else 0.0,
            seed=i,
            max_new_tokens=24,
            top_logprobs=5,
        )
        plain = await tokens_of(coord, GenerationRequest(**base, speculative=SpeculativeOptions(enabled=False)))
        stream = await coord.generate(
            GenerationRequest(**base, speculative=SpeculativeOptions(enabled=True, max_draft_tokens=4))
        )
        chunks = [c async for c in stream]
        fast = [t for c in chunks for t in c.tokens]
        blocks += chunks[-1].usage.speculation.speculative_blocks
        assert [t.token_id for t in fast] == [t.token_id for t in plain]
        assert len(fast) == len(plain) > 0
        for f, p in zip(fast, plain):
            assert [a.token_id for a in f.top_logprobs] == [a.token_id for a in p.top_logprobs]
            assert [a.text for a in f.top_logprobs] == [a.text for a in p.top_logprobs]
            assert [a.logprob for a in f.top_logprobs] == pytest.approx([a.logprob for a in p.top_logprobs], abs=1e-5)
            assert f.logprob == pytest.approx(p.logprob, abs=1e-5)
    assert blocks > 0  # the speculative path really ran
