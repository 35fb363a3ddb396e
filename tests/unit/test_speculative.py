"""Speculative verification: the coupled rule equals plain decoding, the rejection rule samples p.

No models: target distributions are built directly from random logits over a small vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from eft_serve.core.merge import MergedDistribution, logsumexp
from eft_serve.core.sampling import SamplingParams, choose_token, sampling_distribution
from eft_serve.core.speculative import AcceptanceRule, BlockVerdict, verify_block

# Significance level of every goodness-of-fit check below. The seeds are fixed (0..N-1), so each
# check is deterministic; α bounds the chance that a *correct* sampler fails for a given seed set.
ALPHA = 1e-3
# Upper α-quantile of the standard normal, Φ⁻¹(1 − 1e-3).
Z_ALPHA = 3.090232306167813
N_SEEDS = 20_000


def dist_from_logits(logits: np.ndarray) -> MergedDistribution:
    x = np.asarray(logits, dtype=np.float64)
    return MergedDistribution(np.arange(len(x), dtype=np.int64), x - logsumexp(x), {})


def random_dist(rng: np.random.Generator, vocab: int, scale: float = 1.5) -> MergedDistribution:
    return dist_from_logits(rng.normal(scale=scale, size=vocab))


def plain_decoding_reference(
    target: Sequence[MergedDistribution], draft: Sequence[int], params: SamplingParams, first_position: int
) -> tuple[list[int], int]:
    """What non-speculative decoding emits over the block, stated declaratively.

    Plain decoding picks `choose_token(target[j], params, n + j)` at each position; target[j] is
    only the distribution plain decoding sees while the draft agreed with every earlier pick, so
    the block yields the picks up to and including the first one that differs from the draft.
    """
    picks = [choose_token(d, params, first_position + j) for j, d in enumerate(target)]
    agree = 0
    while agree < len(draft) and picks[agree] == draft[agree]:
        agree += 1
    return picks[: agree + 1], agree


PARAM_GRID = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.7),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.8, top_p=0.5),
    SamplingParams(temperature=1.2, top_k=5),
    SamplingParams(temperature=1.0, top_k=3, top_p=0.8),
    SamplingParams(temperature=0.0, top_k=4, top_p=0.7),
]


# --- 1. coupled == sequential ---------------------------------------------------------------


@pytest.mark.parametrize("base", PARAM_GRID, ids=lambda p: f"T{p.temperature}-p{p.top_p}-k{p.top_k}")
def test_coupled_equals_plain_decoding_over_random_blocks(base: SamplingParams) -> None:
    rng = np.random.default_rng(1234)
    seen_accepted: set[int] = set()
    for trial in range(150):
        vocab = int(rng.integers(12, 51))
        k = int(rng.integers(0, 6))
        first_position = int(rng.integers(0, 500))
        params = SamplingParams(
            temperature=base.temperature, top_p=base.top_p, top_k=base.top_k, seed=int(rng.integers(0, 2**63))
        )
        target = [random_dist(rng, vocab) for _ in range(k + 1)]
        # A draft that is mostly right: the token plain decoding picks, perturbed at some positions
        # (sometimes to an id outside the support).
        draft = [choose_token(target[j], params, first_position + j) for j in range(k)]
        for j in range(k):
            r = rng.random()
            if r < 0.15:
                draft[j] = (draft[j] + int(rng.integers(1, vocab))) % vocab
            elif r < 0.2:
                draft[j] = vocab + int(rng.integers(0, 10))
        verdict = verify_block(target, draft, params, first_position)
        expected_tokens, expected_accepted = plain_decoding_reference(target, draft, params, first_position)
        assert verdict == BlockVerdict(expected_tokens, expected_accepted), f"trial {trial}"
        assert verdict.tokens[: verdict.accepted] == draft[: verdict.accepted]
        assert 1 <= len(verdict.tokens) == verdict.accepted + 1 <= k + 1
        seen_accepted.add(verdict.accepted)
    # The grid exercises both early mismatches and fully accepted blocks.
    assert 0 in seen_accepted and max(seen_accepted) >= 4


def test_coupled_all_accepted_gives_k_plus_one_tokens_and_k_zero_is_one_plain_step() -> None:
    rng = np.random.default_rng(7)
    for seed in range(50):
        params = SamplingParams(temperature=1.0, seed=seed)
        target = [random_dist(rng, 20) for _ in range(4)]
        picks = [choose_token(d, params, 100 + j) for j, d in enumerate(target)]
        verdict = verify_block(target, picks[:3], params, first_position=100)
        assert verdict == BlockVerdict(picks, 3)
        # k = 0: exactly the token plain decoding picks at that position.
        single = verify_block(target[:1], [], params, first_position=100)
        assert single == BlockVerdict([picks[0]], 0)
        # A wrong first draft token: nothing kept, the plain pick replaces it.
        wrong = (picks[0] + 1) % 20
        assert verify_block(target[:2], [wrong], params, 100) == BlockVerdict([picks[0]], 0)


def toy_model(prefix: Sequence[int], vocab: int = 16) -> MergedDistribution:
    """A deterministic 'language model': next-token logits are a function of the whole prefix."""
    rng = np.random.default_rng([len(prefix), *prefix])
    return dist_from_logits(rng.normal(scale=2.0, size=vocab))


def toy_drafter(prefix: Sequence[int], vocab: int = 16) -> int:
    """Greedy on the toy model, but wrong whenever the prefix sum is divisible by 4."""
    best = int(np.argmax(toy_model(prefix, vocab).logprobs))
    return (best + 1) % vocab if sum(prefix) % 4 == 0 else best


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_coupled_speculative_generation_is_identical_to_plain_generation(temperature: float, k: int) -> None:
    prompt, length = [3, 1, 4], 40
    for seed in range(12):
        params = SamplingParams(temperature=temperature, seed=seed)
        plain = list(prompt)
        while len(plain) < len(prompt) + length:
            plain.append(choose_token(toy_model(plain), params, position=len(plain)))
        spec = list(prompt)
        blocks = 0
        while len(spec) < len(prompt) + length:
            draft: list[int] = []
            for _ in range(k):
                draft.append(toy_drafter(spec + draft))
            target = [toy_model(spec + draft[:j]) for j in range(k + 1)]
            spec += verify_block(target, draft, params, first_position=len(spec)).tokens
            blocks += 1
        assert spec[: len(plain)] == plain, f"seed {seed}"
        assert blocks < length  # the drafter was right often enough for speculation to save steps


# --- 2. rejection sampling is distributed as the target --------------------------------------


def chi2_critical(df: int, z: float = Z_ALPHA) -> float:
    """Upper quantile of χ²(df) by the Wilson–Hilferty approximation.

    scipy is not a dependency of this project, so instead of `scipy.stats.chi2.ppf(1 - α, df)`
    we use (χ²/df)^(1/3) ≈ N(1 − 2/(9df), 2/(9df)). At α = 1e-3 it overestimates the exact
    quantile by < 2.5 % for df ≥ 2 (1.2 % at df 5, 0.5 % at df 11), so the effective significance
    is slightly below α: the check is, if anything, marginally more lenient than stated.
    """
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def test_chi2_critical_matches_tables() -> None:
    # χ²_{0.999} quantiles from standard tables.
    for df, table in [(2, 13.816), (5, 20.515), (8, 26.124), (11, 31.264), (20, 45.315), (49, 85.351)]:
        assert table <= chi2_critical(df) <= table * 1.025


def assert_distributed_as(observed_tokens: Sequence[int], probs: np.ndarray, label: str) -> None:
    """χ² goodness of fit of `observed_tokens` (ids 0..V-1) to `probs` at significance ALPHA."""
    n = len(observed_tokens)
    counts = np.bincount(np.asarray(observed_tokens, dtype=np.int64), minlength=len(probs)).astype(np.float64)
    possible = probs > 0
    assert counts[~possible].sum() == 0, f"{label}: emitted a token of probability 0"
    expected = n * probs[possible]
    assert expected.min() >= 5, f"{label}: test design error, expected count {expected.min():.1f} < 5"
    stat = float(((counts[possible] - expected) ** 2 / expected).sum())
    df = int(possible.sum()) - 1
    critical = chi2_critical(df)
    assert stat < critical, f"{label}: χ² = {stat:.1f} ≥ {critical:.1f} (df {df}, α {ALPHA})"


def fixed_block(k: int, vocab: int = 12) -> list[MergedDistribution]:
    rng = np.random.default_rng(2024 + k)
    return [random_dist(rng, vocab, scale=1.0) for _ in range(k + 1)]


def run_rejection(
    target: Sequence[MergedDistribution], draft: Sequence[int], make_params: Callable[[int], SamplingParams]
) -> list[BlockVerdict]:
    return [verify_block(target, draft, make_params(seed), 37, rule="rejection") for seed in range(N_SEEDS)]


REJECTION_PARAMS: dict[str, Callable[[int], SamplingParams]] = {
    "plain": lambda seed: SamplingParams(temperature=1.0, seed=seed),
    "top_k_top_p_hot": lambda seed: SamplingParams(temperature=1.5, top_k=9, top_p=0.95, seed=seed),
}


@pytest.mark.parametrize(
    ("k", "draft_kind", "params_name"),
    [
        (1, "mode", "plain"),
        (1, "unlikely", "plain"),
        (3, "mode", "plain"),
        (3, "unlikely", "plain"),
        (1, "outside_support", "plain"),
        (3, "mode", "top_k_top_p_hot"),
        (3, "unlikely", "top_k_top_p_hot"),
        (1, "truncated", "top_k_top_p_hot"),
    ],
)
def test_rejection_first_token_is_distributed_as_p0(k: int, draft_kind: str, params_name: str) -> None:
    """Over N = 20 000 seeds, the first emitted token follows p_0 (χ², significance α = 1e-3).

    The draft's first token is the mode of p_0, its least likely possible token, an id outside
    the support, or a token removed by top-k/top-p (p = 0); the rest of the draft is the mode
    of each later position.
    """
    make_params = REJECTION_PARAMS[params_name]
    target = fixed_block(k)
    p = [sampling_distribution(d, make_params(0)) for d in target]
    positive = np.flatnonzero(p[0] > 0)
    first = {
        "mode": int(np.argmax(p[0])),
        "unlikely": int(positive[np.argmin(p[0][positive])]),
        "outside_support": 99,
        "truncated": int(np.flatnonzero(p[0] == 0)[0]) if not p[0].all() else -1,
    }[draft_kind]
    assert first >= 0, "test design error: nothing truncated"
    draft = [first] + [int(np.argmax(p[j])) for j in range(1, k)]
    verdicts = run_rejection(target, draft, make_params)
    assert_distributed_as([v.tokens[0] for v in verdicts], p[0], f"{draft_kind}/{params_name}/k={k}")
    # Acceptance of d_0 happens with probability p_0(d_0) (normal approximation, |z| < 4).
    accepted = sum(v.accepted >= 1 for v in verdicts)
    p_acc = float(p[0][first]) if first < len(p[0]) else 0.0
    sd = math.sqrt(N_SEEDS * p_acc * (1 - p_acc))
    assert abs(accepted - N_SEEDS * p_acc) <= 4 * sd + 1e-9
    for v in verdicts:
        assert v.tokens[: v.accepted] == draft[: v.accepted] and len(v.tokens) == v.accepted + 1


@pytest.mark.parametrize("params_name", list(REJECTION_PARAMS))
def test_rejection_second_token_given_first_accepted_is_distributed_as_p1(params_name: str) -> None:
    """Conditioned on d_0 being kept, the second emitted token follows p_1 (χ², α = 1e-3).

    p_0 is sharpened so that d_0 (its mode) is kept often; d_1 is p_1's second most likely token,
    so the second token is a mix of kept drafts and residual draws.
    """
    make_params = REJECTION_PARAMS[params_name]
    rng = np.random.default_rng(99)
    sharp = rng.normal(size=12)
    sharp[5] += 3.0
    target = [dist_from_logits(sharp)] + [random_dist(rng, 12, scale=1.0) for _ in range(3)]
    p = [sampling_distribution(d, make_params(0)) for d in target]
    assert int(np.argmax(p[0])) == 5 and p[0][5] > 0.6
    draft = [5, int(np.argsort(-p[1])[1]), int(np.argmax(p[2]))]
    verdicts = run_rejection(target, draft, make_params)
    second = [v.tokens[1] for v in verdicts if v.accepted >= 1]
    assert len(second) > 0.6 * N_SEEDS
    assert_distributed_as(second, p[1], f"second position/{params_name}")


def test_rejection_all_accepted_bonus_token_is_distributed_as_pk() -> None:
    """When every draft token is (numerically) certain and so always kept, the bonus token is a
    draw from p_k (χ², α = 1e-3)."""
    rng = np.random.default_rng(5)
    certain = np.full(12, -50.0)
    certain[3] = 10.0  # p(3) = 1 − O(e^-60): always accepted
    target = [dist_from_logits(certain), dist_from_logits(certain), random_dist(rng, 12, scale=1.0)]
    params_of = REJECTION_PARAMS["plain"]
    verdicts = run_rejection(target, [3, 3], params_of)
    assert all(v.accepted == 2 and v.tokens[:2] == [3, 3] for v in verdicts)
    assert_distributed_as([v.tokens[2] for v in verdicts], sampling_distribution(target[2], params_of(0)), "bonus")


def test_rejection_greedy_matches_argmax_and_never_keeps_impossible_tokens() -> None:
    rng = np.random.default_rng(11)
    for seed in range(100):
        target = [random_dist(rng, 15) for _ in range(3)]
        greedy = SamplingParams(temperature=0.0, seed=seed)
        argmax = [int(np.argmax(d.logprobs)) for d in target]
        # Greedy: p is the argmax point mass, so rejection coincides with the coupled rule.
        for draft in ([argmax[0], argmax[1]], [argmax[0], (argmax[1] + 1) % 15], [99, argmax[1]]):
            assert verify_block(target, draft, greedy, 0, "rejection") == verify_block(target, draft, greedy, 0)
        # A draft token truncated away by top-k (or outside the support) is always rejected.
        top2 = SamplingParams(temperature=1.0, top_k=2, seed=seed)
        outside_top2 = int(np.argsort(-target[0].logprobs)[5])
        for bad in (outside_top2, 15, 1000):
            verdict = verify_block(target, [bad, argmax[1]], top2, 0, "rejection")
            assert verdict.accepted == 0 and verdict.tokens[0] in np.argsort(-target[0].logprobs)[:2]


# --- 3. determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["coupled", "rejection"])
def test_same_seed_same_verdict(rule: AcceptanceRule) -> None:
    rng = np.random.default_rng(3)
    target = [random_dist(rng, 30, scale=0.5) for _ in range(5)]
    draft = [int(np.argmax(d.logprobs)) for d in target[:4]]
    verdicts = set()
    for seed in range(40):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        first = verify_block(target, draft, params, 10, rule)
        again = verify_block(target, draft, params, 10, rule)
        assert first == again
        verdicts.add((tuple(first.tokens), first.accepted))
    assert len(verdicts) > 5  # the seed matters


# --- 4. shape errors -------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["coupled", "rejection"])
def test_length_mismatch_is_a_value_error(rule: AcceptanceRule) -> None:
    rng = np.random.default_rng(0)
    target = [random_dist(rng, 12) for _ in range(3)]
    for n_draft in (0, 1, 3, 4):
        with pytest.raises(ValueError, match="one target distribution per drafted token plus one"):
            verify_block(target, [0] * n_draft, SamplingParams(), 0, rule)
    with pytest.raises(ValueError):
        verify_block([], [], SamplingParams(), 0, rule)
