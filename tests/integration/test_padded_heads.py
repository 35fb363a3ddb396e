"""Padded output heads (issue 18 item 1): the merge support is the shared tokenizer's ids.

Families built by `eft_serve.testing.arch_families`: heads padded beyond the tokenizer, the large
one more than the small ones (as Pythia-12b vs -70m, Qwen2.5-72B vs -1.5B), and a family whose
padded rows are made to win the β-weighted ratio, so a merge over the raw heads would emit ids no
tokenizer entry has. Real HF engines behind the in-process transport; the reference merges plain
forwards over `[0, len(tokenizer))` only.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from eft_serve.cache.codec import decode_result
from eft_serve.cache.memory import MemoryCache
from eft_serve.cache.next_token_cache import NextTokenCache
from eft_serve.config import CoordinatorConfig, demo_config
from eft_serve.coordinator.request import GenerationRequest, MergeOptions, SpeculativeOptions
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.coordinator.vocabulary import check_shared_vocabulary
from eft_serve.engine.hf_engine import HFEngine
from eft_serve.engine.types import DraftQuery, SequenceQuery
from eft_serve.errors import FailedPrecondition
from eft_serve.testing.arch_families import build_arch_family, demo_tokenizer, merged_scores
from eft_serve.transport.inprocess import InProcessPool

ROLES = ("large_base", "small_base", "small_ft")
UPSCALE = {"large_base": 1.0, "small_ft": 1.0, "small_base": -1.0}
PROMPTS = ["Q: Where does the", "The capital of", "A: It is", "Q: Who", "In the", "Q: What colour"]


@pytest.fixture(scope="module")
def tokenizer():
    return demo_tokenizer()


def _stack(family, tokenizer):
    engines = {r: HFEngine.load(family.paths[r], name=r, device="cpu", kv_cache_bytes=2**24) for r in ROLES}
    coord = EftCoordinator(
        {r: InProcessPool(e, r) for r, e in engines.items()},
        demo_config().recipes,
        tokenizer,
        CoordinatorConfig(max_new_tokens_cap=64),
    )
    return coord, engines


@pytest.fixture(scope="module")
def uneven(tmp_path_factory, tokenizer):
    """Llama-shaped, the large head padded by 128 rows and the small heads by 16 (as Qwen2.5-72B vs -1.5B)."""
    n = len(tokenizer)
    family = build_arch_family(
        "llama",
        tmp_path_factory.mktemp("uneven"),
        tokenizer=tokenizer,
        large_head_rows=n + 128,
        small_head_rows=n + 16,
    )
    return family, *_stack(family, tokenizer)


@pytest.fixture(scope="module")
def adversarial(tmp_path_factory, tokenizer):
    """Equal padded heads whose padded rows win the up-scaling ratio unless they are cut off."""
    n = len(tokenizer)
    family = build_arch_family(
        "llama",
        tmp_path_factory.mktemp("adversarial"),
        tokenizer=tokenizer,
        large_head_rows=n + 5,
        small_head_rows=n + 5,
        attractive_padding=True,
    )
    return family, *_stack(family, tokenizer)


async def _greedy(coord, prompt: str, n: int, **options) -> tuple[list[int], list]:
    speculative = options.pop("speculative", False)
    top_logprobs = options.pop("top_logprobs", 0)
    stream = await coord.generate(
        GenerationRequest(
            prompt=prompt,
            merge=MergeOptions(**options),
            temperature=0,
            max_new_tokens=n,
            ignore_eos=True,
            top_logprobs=top_logprobs,
            speculative=SpeculativeOptions(enabled=speculative),
        )
    )
    tokens = [t for c in [c async for c in stream] for t in c.tokens]
    return [t.token_id for t in tokens], tokens


def _reference_greedy(models, prompt_ids: list[int], n: int, support: int) -> list[int]:
    ids, out = list(prompt_ids), []
    for _ in range(n):
        token = int(torch.argmax(merged_scores(models, UPSCALE, ids, support)))
        out.append(token)
        ids.append(token)
    return out


def _models(family):
    return {r: AutoModelForCausalLM.from_pretrained(family.paths[r], dtype=torch.float32).eval() for r in ROLES}


def test_engines_report_the_tokenizer_as_their_vocabulary(uneven, tokenizer) -> None:
    family, _, engines = uneven
    for role, engine in engines.items():
        assert engine.info.vocab_size == len(tokenizer)
        assert engine.info.extra["head_rows"] == str(family.head_rows[role])
        res = engine.next_token_logprobs([SequenceQuery(tokenizer.encode("Q: Where"))], 0)[0].positions[0]
        assert res.full_logprobs is not None and res.full_logprobs.shape == (len(tokenizer),)
        # Renormalised over the tokenizer's ids: a distribution of its own, not a slice of one.
        assert abs(float(torch.tensor(res.full_logprobs).double().exp().sum()) - 1.0) < 1e-4
    # Heads of different sizes still agree on one vocabulary.
    check_shared_vocabulary({r: e.info for r, e in engines.items()})


async def test_heads_of_different_sizes_serve_and_match_the_reference(uneven, tokenizer) -> None:
    family, coord, _ = uneven
    await coord.start()
    models = _models(family)
    for prompt in PROMPTS[:3]:
        ids = tokenizer.encode(prompt)
        expected = _reference_greedy(models, ids, 12, len(tokenizer))
        got, _ = await _greedy(coord, prompt, 12, recipe="upscale", logprob_top_k=0)
        assert got == expected, prompt


def test_the_adversarial_family_really_prefers_padded_rows(adversarial, tokenizer) -> None:
    # Without the fix the merge runs over the (equal) padded heads: this family makes it pick a
    # padded id, so the next test could fail.
    family, _, _ = adversarial
    models = _models(family)
    n_rows = family.head_rows["small_base"]
    picked = [int(torch.argmax(merged_scores(models, UPSCALE, tokenizer.encode(p), n_rows))) for p in PROMPTS]
    assert sum(i >= len(tokenizer) for i in picked) >= len(PROMPTS) // 2, picked


@pytest.mark.parametrize("mode", ["exact", "topk", "topk_conservative", "speculative"])
async def test_padded_ids_are_never_emitted(adversarial, tokenizer, mode: str) -> None:
    family, coord, _ = adversarial
    await coord.start()
    n = len(tokenizer)
    options = {
        "exact": dict(logprob_top_k=0),
        "topk": dict(logprob_top_k=5, conservative=False),
        "topk_conservative": dict(logprob_top_k=5, conservative=True),
        "speculative": dict(logprob_top_k=0, speculative=True),
    }[mode]
    models = _models(family) if mode in ("exact", "speculative") else None
    for prompt in PROMPTS:
        got, tokens = await _greedy(coord, prompt, 8, recipe="upscale", top_logprobs=5, **dict(options))
        assert max(got) < n, (prompt, got)
        assert all(alt.token_id < n for t in tokens for alt in t.top_logprobs)
        if models is not None:  # exact: the reference over the tokenizer's ids only
            assert got == _reference_greedy(models, tokenizer.encode(prompt), 8, n), prompt


def test_topk_tail_candidates_and_drafts_stay_inside_the_tokenizer(adversarial, tokenizer) -> None:
    _, _, engines = adversarial
    n = len(tokenizer)
    ids = tokenizer.encode("Q: Where does the")
    for role, engine in engines.items():
        pos = engine.next_token_logprobs([SequenceQuery(ids, candidate_ids=[0, n - 1])], 8)[0].positions[0]
        assert pos.top_ids.max() < n
        # The tail is the tokenizer's mass outside the top-k: top + tail = 1 over [0, n).
        total = float(torch.tensor(pos.top_logprobs).double().exp().sum()) + float(torch.tensor(pos.tail_logmass).exp())
        assert abs(total - 1.0) < 1e-4, role
        with pytest.raises(ValueError, match="outside"):
            engine.next_token_logprobs([SequenceQuery(ids, candidate_ids=[n])], 8)
        drafted = engine.draft([DraftQuery(ids, 6)])[0]
        assert max(drafted) < n, (role, drafted)


def _reference_score(models, ids: list[int], target: int, n: int, top_k: int) -> tuple[float, dict[str, float]]:
    """The merged and per-model logprob of `target` after `ids`, from plain forwards over the
    tokenizer's ids [0, n) only. Top-k mode as the contract defines it: each model reports its
    top-k and the target exactly, and spreads the rest of its mass evenly over the n - k ids it
    did not report; the merge normalises over the union of reported ids."""
    with torch.inference_mode():
        lps = {
            r: torch.log_softmax(m(torch.tensor([ids])).logits[0, -1, :n].double(), dim=-1) for r, m in models.items()
        }
    if top_k == 0:
        score = merged_scores(models, UPSCALE, ids, n)
        return float(score[target] - torch.logsumexp(score, 0)), {r: float(lp[target]) for r, lp in lps.items()}
    tops = {r: set(torch.topk(lp, top_k).indices.tolist()) for r, lp in lps.items()}
    support = sorted(set().union(*tops.values()) | {target})

    def value(role: str, i: int) -> float:
        lp = lps[role]
        if i in tops[role] or i == target:
            return float(lp[i])
        top_mass = float(lp[sorted(tops[role])].exp().sum())
        return float(torch.log1p(torch.tensor(-top_mass, dtype=torch.float64))) - math.log(n - top_k)

    score = torch.tensor([sum(c * value(r, i) for r, c in UPSCALE.items()) for i in support], dtype=torch.float64)
    merged = score - torch.logsumexp(score, 0)
    return float(merged[support.index(target)]), {r: value(r, target) for r in models}


@pytest.mark.parametrize("top_k", [0, 5])
async def test_score_matches_a_reference_over_the_tokenizers_ids(adversarial, tokenizer, top_k: int) -> None:
    # The adversarial family's padded rows hold most of every raw head's mass: a score that
    # normalised (or spread a top-k tail) over the padded heads would be far off.
    family, coord, _ = adversarial
    await coord.start()
    models = _models(family)
    n = len(tokenizer)
    for prompt, continuation in [("Q: Where does the", " capital of"), ("The capital of", " the river is")]:
        result = await coord.score(prompt, continuation, MergeOptions(recipe="upscale", logprob_top_k=top_k))
        prompt_ids, cont_ids = tokenizer.encode(prompt), tokenizer.encode(continuation)
        assert [t.token_id for t in result.tokens] == cont_ids and max(cont_ids) < n
        total = 0.0
        for j, token in enumerate(result.tokens):
            merged, per_model = _reference_score(models, prompt_ids + cont_ids[:j], cont_ids[j], n, top_k)
            assert token.logprob == pytest.approx(merged, abs=2e-3), (prompt, j)
            assert token.model_logprobs == pytest.approx(per_model, abs=2e-3), (prompt, j)
            total += merged
        assert result.total_logprob == pytest.approx(total, abs=5e-3)


def test_different_tokenizers_are_refused_naming_sizes_and_first_ids(tmp_path, tokenizer, uneven) -> None:
    _, _, engines = uneven
    other = demo_tokenizer(seed=1)
    infos = {r: e.info for r, e in engines.items()}
    mixed = dict(infos)
    from dataclasses import replace

    from eft_serve.engine.fingerprint import vocab_fingerprint

    mixed["small_ft"] = replace(infos["small_ft"], vocab_size=len(other), vocab_fingerprint=vocab_fingerprint(other))
    with pytest.raises(FailedPrecondition) as err:
        check_shared_vocabulary(mixed, {"large_base": tokenizer, "small_ft": other})
    msg = str(err.value)
    assert "'small_ft'" in msg and f"tokenizer of {len(other)} ids" in msg and "first differing ids: id " in msg


class _RecordingCache(MemoryCache):
    """The in-process cache, keeping every value it was given (to read back what was stored)."""

    def __init__(self) -> None:
        super().__init__(max_bytes=256 * 2**20)
        self.values: list[bytes] = []

    async def set_many(self, items) -> None:
        self.values.extend(bytes(v) for _, v in items)
        await super().set_many(items)


@pytest.mark.parametrize("mode", ["exact", "topk", "speculative"])
async def test_cached_steps_of_padded_heads_hold_only_tokenizer_ids(adversarial, tokenizer, mode: str) -> None:
    # The adversarial padded stack behind the coordinator's next-token cache: what is stored is
    # what the engines answered (cut to the tokenizer), and a warm run serves it unchanged.
    _, _, engines = adversarial
    n = len(tokenizer)
    backend = _RecordingCache()
    coord = EftCoordinator(
        {r: InProcessPool(e, r) for r, e in engines.items()},
        demo_config().recipes,
        tokenizer,
        CoordinatorConfig(max_new_tokens_cap=64),
        cache=NextTokenCache(backend),
    )
    await coord.start()
    options = {
        "exact": dict(logprob_top_k=0),
        "topk": dict(logprob_top_k=5),
        "speculative": dict(logprob_top_k=0, speculative=True),
    }[mode]
    try:
        for prompt in PROMPTS[:3]:
            cold, cold_tokens = await _greedy(coord, prompt, 8, recipe="upscale", top_logprobs=3, **dict(options))
            stored = len(backend.values)
            warm, warm_tokens = await _greedy(coord, prompt, 8, recipe="upscale", top_logprobs=3, **dict(options))
            assert warm == cold and max(cold) < n, (prompt, cold)
            if mode != "speculative":  # the same logprobs and alternatives, read from the cache
                assert warm_tokens == cold_tokens
            else:  # a block's drafter scores its own draft, in a forward pass of another shape
                assert [t.logprob for t in warm_tokens] == pytest.approx([t.logprob for t in cold_tokens], abs=1e-4)
            if mode != "speculative":  # every step was a hit: nothing new to store
                assert len(backend.values) == stored
        merge = MergeOptions(recipe="upscale", logprob_top_k=options["logprob_top_k"])
        cold_score = await coord.score(PROMPTS[0], " capital of", merge)
        warm_score = await coord.score(PROMPTS[0], " capital of", merge)
        assert warm_score == cold_score
        assert backend.stats().hits > 0 and backend.values
        for raw in backend.values:
            for pos in decode_result(raw).positions:
                assert len(pos.top_ids) == 0 or int(pos.top_ids.max()) < n
                if pos.full_logprobs is not None:
                    assert len(pos.full_logprobs) == n
                if options["logprob_top_k"]:
                    assert len(pos.top_ids) == options["logprob_top_k"] and pos.full_logprobs is None
    finally:
        await coord.stop()
