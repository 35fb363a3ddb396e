"""Merge math: hand-computed values, the β = 0 identity, normalisation, recipe composition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eft_serve.config import RecipeConfig
from eft_serve.core.merge import MergedDistribution, logsumexp, merge_position, top_p_mask
from eft_serve.core.recipe import resolve_recipe
from eft_serve.engine.types import PositionLogprobs
from eft_serve.errors import InvalidArgument, NotFound

RECIPES = {
    "upscale": RecipeConfig(base="large_base", experts=["small_ft"], reference="small_base"),
    "interp": RecipeConfig(
        base="large_base", experts=["a", "b"], reference="small_base", default_weights={"a": 1.0, "b": 0.0}
    ),
    "solo": RecipeConfig(base="large_base"),
}


def full(logits: list[float]) -> PositionLogprobs:
    x = np.asarray(logits, dtype=np.float64)
    lp = (x - logsumexp(x)).astype(np.float32)
    return PositionLogprobs(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32), -math.inf, lp)


def topk(lp_full: np.ndarray, k: int) -> PositionLogprobs:
    order = np.argsort(-lp_full)[:k]
    top = lp_full[order]
    rest = 1.0 - float(np.exp(top.astype(np.float64)).sum())
    tail = math.log(rest) if rest > 1e-7 else -math.inf
    return PositionLogprobs(order.astype(np.int64), top.astype(np.float32), np.zeros(0, np.float32), tail, None)


def test_hand_computed_upscale() -> None:
    # p_large = [0.5, 0.25, 0.25], p_ft = [0.2, 0.6, 0.2], p_ref = [0.4, 0.4, 0.2]; β = 1:
    # unnormalised p = p_large · p_ft / p_ref = [0.25, 0.375, 0.25] -> / 0.875
    res = {
        "large_base": full(np.log([0.5, 0.25, 0.25]).tolist()),
        "small_ft": full(np.log([0.2, 0.6, 0.2]).tolist()),
        "small_base": full(np.log([0.4, 0.4, 0.2]).tolist()),
    }
    dist = merge_position(resolve_recipe(RECIPES, "upscale"), res, vocab_size=3)
    expected = np.array([0.25, 0.375, 0.25]) / 0.875
    np.testing.assert_allclose(np.exp(dist.logprobs), expected, rtol=1e-5)
    # β = 2 squares the ratio: 0.5·(0.5)^2, 0.25·(1.5)^2, 0.25·1
    dist2 = merge_position(resolve_recipe(RECIPES, "upscale", beta=2.0), res, vocab_size=3)
    raw = np.array([0.5 * 0.25, 0.25 * 2.25, 0.25 * 1.0])
    np.testing.assert_allclose(np.exp(dist2.logprobs), raw / raw.sum(), rtol=1e-5)


def test_beta_zero_reproduces_large_base() -> None:
    rng = np.random.default_rng(0)
    res = {r: full(rng.normal(size=50).tolist()) for r in ("large_base", "small_ft", "small_base")}
    dist = merge_position(resolve_recipe(RECIPES, "upscale", beta=0.0), res, vocab_size=50)
    np.testing.assert_allclose(dist.logprobs, res["large_base"].full_logprobs, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_outputs_normalised_exact_and_topk(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fulls = {r: full((3 * rng.normal(size=200)).tolist()) for r in ("large_base", "small_ft", "small_base")}
    recipe = resolve_recipe(RECIPES, "upscale", beta=float(rng.uniform(0, 2)))
    exact = merge_position(recipe, fulls, vocab_size=200)
    assert abs(logsumexp(exact.logprobs)) < 1e-9
    approx = merge_position(recipe, {r: topk(v.full_logprobs, 20) for r, v in fulls.items()}, vocab_size=200)
    assert abs(logsumexp(approx.logprobs)) < 1e-9
    assert set(approx.support.tolist()) <= set(range(200))


def test_topk_with_everything_reported_is_exact() -> None:
    rng = np.random.default_rng(3)
    fulls = {r: full(rng.normal(size=30).tolist()) for r in ("large_base", "small_ft", "small_base")}
    recipe = resolve_recipe(RECIPES, "upscale")
    exact = merge_position(recipe, fulls, vocab_size=30)
    approx = merge_position(recipe, {r: topk(v.full_logprobs, 30) for r, v in fulls.items()}, vocab_size=30)
    np.testing.assert_allclose(approx.logprobs, exact.logprobs, atol=1e-5)


def test_candidates_make_topk_exact_on_their_support() -> None:
    rng = np.random.default_rng(4)
    fulls = {r: full((2 * rng.normal(size=40)).tolist()) for r in ("large_base", "small_ft", "small_base")}
    cands = [1, 7, 33]
    recipe = resolve_recipe(RECIPES, "upscale")
    res = {}
    for r, v in fulls.items():
        p = topk(v.full_logprobs, 3)
        p.candidate_logprobs = v.full_logprobs[cands]
        res[r] = p
    dist = merge_position(recipe, res, vocab_size=40, candidate_ids=cands)
    for r, v in fulls.items():
        for c in cands:
            assert dist.model_logprob_of(r, c) == pytest.approx(float(v.full_logprobs[c]), abs=1e-6)


def test_recipes_compose_interpolation_equals_weighted_sum() -> None:
    rng = np.random.default_rng(5)
    fulls = {r: full(rng.normal(size=20).tolist()) for r in ("large_base", "a", "b", "small_base")}
    lam = 0.3
    dist = merge_position(resolve_recipe(RECIPES, "interp", expert_weights={"a": 1 - lam, "b": lam}), fulls, 20)
    lp = {r: v.full_logprobs.astype(np.float64) for r, v in fulls.items()}
    score = lp["large_base"] + (1 - lam) * (lp["a"] - lp["small_base"]) + lam * (lp["b"] - lp["small_base"])
    np.testing.assert_allclose(dist.logprobs, score - logsumexp(score), atol=1e-6)
    # λ = 0 is the one-expert up-scaling recipe with expert "a".
    only_a = merge_position(resolve_recipe(RECIPES, "interp"), fulls, 20)
    ups = merge_position(
        resolve_recipe({"u": RecipeConfig(base="large_base", experts=["a"], reference="small_base")}, "u"), fulls, 20
    )
    np.testing.assert_allclose(only_a.logprobs, ups.logprobs, atol=1e-9)


def test_conservative_sets_ratio_to_one_outside_expert_top_p() -> None:
    res = {
        "large_base": full(np.log([0.4, 0.3, 0.2, 0.1]).tolist()),
        "small_ft": full(np.log([0.9, 0.05, 0.03, 0.02]).tolist()),
        "small_base": full(np.log([0.25, 0.25, 0.25, 0.25]).tolist()),
    }
    dist = merge_position(resolve_recipe(RECIPES, "upscale"), res, 4, conservative_top_p=0.5)
    # Only token 0 is in the expert's top-0.5 set: its ratio 0.9/0.25 applies, others keep ratio 1.
    raw = np.array([0.4 * 0.9 / 0.25, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(np.exp(dist.logprobs), raw / raw.sum(), rtol=1e-5)


def test_top_p_mask_smallest_set() -> None:
    lp = np.log(np.array([0.1, 0.6, 0.3]))
    assert top_p_mask(lp, 0.5).tolist() == [False, True, False]
    assert top_p_mask(lp, 0.7).tolist() == [False, True, True]
    assert top_p_mask(lp, 1.0).all()


def test_recipe_errors_are_actionable() -> None:
    with pytest.raises(NotFound, match="available recipes"):
        resolve_recipe(RECIPES, "nope")
    with pytest.raises(InvalidArgument, match="finite"):
        resolve_recipe(RECIPES, "upscale", beta=float("nan"))
    with pytest.raises(InvalidArgument, match="not experts"):
        resolve_recipe(RECIPES, "upscale", expert_weights={"zzz": 1.0})
    with pytest.raises(InvalidArgument, match="finite"):
        resolve_recipe(RECIPES, "interp", expert_weights={"a": float("inf")})


def test_coefficients() -> None:
    r = resolve_recipe(RECIPES, "interp", beta=2.0, expert_weights={"a": 0.5, "b": 0.5})
    assert r.coefficients() == {"large_base": 1.0, "a": 1.0, "b": 1.0, "small_base": -2.0}
    assert r.roles == ("large_base", "a", "b", "small_base")


def _dist(support: list[int], probs: list[float]) -> MergedDistribution:
    return MergedDistribution(
        support=np.asarray(support, dtype=np.int64), logprobs=np.log(np.asarray(probs)), model_logprobs={}
    )


def test_top_orders_descending_and_breaks_ties_by_lower_id() -> None:
    dist = _dist([2, 5, 9, 11, 40], [0.1, 0.3, 0.1, 0.4, 0.1])
    top = dist.top(4)
    assert [t for t, _ in top] == [11, 5, 2, 9]  # 2, 9, 40 tie at 0.1: lower ids first
    assert [lp for _, lp in top] == pytest.approx(np.log([0.4, 0.3, 0.1, 0.1]).tolist())
    assert all(isinstance(t, int) and isinstance(lp, float) for t, lp in top)
    assert dist.top(1) == [(11, pytest.approx(math.log(0.4)))]
    assert dist.top(0) == []


def test_top_with_n_over_the_support_returns_the_whole_support() -> None:
    dist = _dist([3, 4, 8], [0.2, 0.5, 0.3])
    assert [t for t, _ in dist.top(50)] == [4, 8, 3]
    # An impossible support token (-inf) still sorts last rather than vanishing or raising.
    impossible = MergedDistribution(
        support=np.array([0, 1, 2], dtype=np.int64), logprobs=np.array([-np.inf, 0.0, -np.inf]), model_logprobs={}
    )
    assert [t for t, _ in impossible.top(3)] == [1, 0, 2]


def test_top_of_a_topk_merge_is_the_merged_support_ranked() -> None:
    rng = np.random.default_rng(7)
    fulls = {r: full((3 * rng.normal(size=100)).tolist()) for r in ("large_base", "small_ft", "small_base")}
    dist = merge_position(
        resolve_recipe(RECIPES, "upscale"), {r: topk(v.full_logprobs, 5) for r, v in fulls.items()}, vocab_size=100
    )
    top = dist.top(1000)
    assert len(top) == len(dist.support) <= 15  # only the union of the models' top-5 sets
    assert sorted(t for t, _ in top) == dist.support.tolist()
    lps = [lp for _, lp in top]
    assert lps == sorted(lps, reverse=True)
    assert all(dist.logprob_of(t) == lp for t, lp in top)
    assert top[0][0] == int(dist.support[np.argmax(dist.logprobs)])


@pytest.mark.parametrize("n", [1, 7, 50, 4000])
def test_top_on_a_large_tied_support_equals_a_full_sort(n: int) -> None:
    # Coarse logprobs: many ties around the n-th value, where selecting before sorting could slip.
    rng = np.random.default_rng(n)
    raw = np.round(rng.normal(size=3000), 1)
    support = np.sort(rng.choice(50_000, size=3000, replace=False)).astype(np.int64)
    dist = MergedDistribution(support=support, logprobs=raw - logsumexp(raw), model_logprobs={})
    reference = sorted(zip(support.tolist(), dist.logprobs.tolist()), key=lambda p: (-p[1], p[0]))[:n]
    assert dist.top(n) == reference


@pytest.mark.parametrize("seed", range(5))
def test_model_top_of_a_topk_merge_is_each_models_own_top_k(seed: int) -> None:
    # Each model's own top-k is in the support with its own values, and no tail estimate of a token
    # it did not report outranks them: its first k alternatives are exactly what its pool sent.
    rng = np.random.default_rng(seed)
    fulls = {r: full((3 * rng.normal(size=100)).tolist()) for r in ("large_base", "small_ft", "small_base")}
    k = 6
    dist = merge_position(
        resolve_recipe(RECIPES, "upscale"), {r: topk(v.full_logprobs, k) for r, v in fulls.items()}, vocab_size=100
    )
    for role, result in fulls.items():
        own = result.full_logprobs
        want = sorted(range(100), key=lambda i: (-own[i], i))[:k]
        got = dist.model_top(role, k)
        assert [t for t, _ in got] == want, role
        assert [lp for _, lp in got] == pytest.approx([float(own[i]) for i in want])
    # Exact mode: the whole vocabulary, so any n is the model's own ranking.
    exact = merge_position(resolve_recipe(RECIPES, "upscale"), fulls, vocab_size=100)
    own = fulls["small_ft"].full_logprobs
    assert [t for t, _ in exact.model_top("small_ft", 30)] == sorted(range(100), key=lambda i: (-own[i], i))[:30]
