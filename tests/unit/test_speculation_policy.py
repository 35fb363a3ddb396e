"""The per-stream speculation policy: plain first step, cost model, fall-back, back-off, probes.

Costs are fed in directly (seconds per plain step, per draft call and per verify call), so every
decision is exact.
"""

from __future__ import annotations

from eft_serve.coordinator.speculation_policy import SpeculationPolicy
from eft_serve.coordinator.validate import SpeculationPlan

PLAIN_S = 0.010  # a plain step: one call to every pool
DRAFT_S_PER_TOKEN = 0.002  # the small drafter, per drafted token
VERIFY_S = 0.010  # a (k+1)-position verify call


def policy(max_k: int = 8, adaptive: bool = True) -> SpeculationPolicy:
    return SpeculationPolicy(SpeculationPlan("small_ft", max_k, adaptive, "coupled"))


def step(p: SpeculationPolicy, agree: bool, signal: bool = True) -> int:
    """One step as the decode loop runs it; returns the draft size used (0 = plain).

    `signal`: the drafter is a model of the recipe, so plain steps report its agreement."""
    k = p.next_draft_size()
    if k == 0:
        p.record_plain(PLAIN_S, agree if signal else None)
    else:
        p.record_block(k, k if agree else 0, DRAFT_S_PER_TOKEN * k, VERIFY_S)
    return k


def gaps_between_blocks(sizes: list[int]) -> list[int]:
    blocks = [i for i, k in enumerate(sizes) if k > 0]
    return [b - a - 1 for a, b in zip(blocks, blocks[1:])]


def test_first_step_is_plain_then_one_measured_plain_step_then_growing_blocks() -> None:
    p = policy()
    assert step(p, agree=True) == 0  # prefills; its time is not a plain step's cost
    assert p.plain_seconds is None
    assert step(p, agree=True) == 0
    assert p.plain_seconds == PLAIN_S
    assert [step(p, agree=True) for _ in range(4)] == [4, 8, 8, 8]  # start at 4, double, cap
    assert p.fallbacks == 0 and p.agreement > 0.9


def test_fixed_blocks_skip_only_the_first_step_and_never_fall_back() -> None:
    p = policy(max_k=3, adaptive=False)
    assert [step(p, agree=False) for _ in range(8)] == [0] + [3] * 7
    assert p.fallbacks == 0


def test_a_drafter_of_the_recipe_that_disagrees_falls_back_after_one_block_and_stays_plain() -> None:
    p = policy()
    sizes = [step(p, agree=False) for _ in range(120)]
    # Its scores in every plain step keep saying it would lose: no costly probe is ever needed.
    assert sizes[:3] == [0, 0, 4] and set(sizes[3:]) == {0}
    assert p.fallbacks == 1 and p.best_block() == 0


def test_a_blind_drafter_probes_with_exponential_back_off() -> None:
    p = policy()
    n = 2 + 1 + 1 + 4 + 1 + 8 + 1 + 16 + 1 + 32 + 1 + 64 + 1 + 64 + 1
    sizes = [step(p, agree=False, signal=False) for _ in range(n)]
    # The first block (4, nothing kept) leaves α ~ 0.23: a one-token block still barely wins on
    # these costs, so one more block; then plain, with probes after 4, 8, ... 64 (the cap).
    assert sizes[:4] == [0, 0, 4, 1]
    assert gaps_between_blocks(sizes) == [0, 4, 8, 16, 32, 64, 64]
    assert set(sizes[3:]) == {0, 1}  # probes are one-token drafts
    assert p.fallbacks == 7


def test_a_verify_timed_cheaper_than_a_plain_step_does_not_keep_a_losing_drafter() -> None:
    # On tiny or idle models the timings are noise: a verify may be measured at a fraction of a
    # plain step. A drafter that never agrees must still fall back (CI once saw 53 one-token
    # blocks in 60 tokens that way), because a verify really does a plain step's work.
    p = policy()
    sizes = []
    for _ in range(60):
        k = p.next_draft_size()
        if k == 0:
            p.record_plain(PLAIN_S, None)
        else:
            p.record_block(k, 0, DRAFT_S_PER_TOKEN * k, VERIFY_S / 10)
        sizes.append(k)
    blocks = sum(1 for k in sizes if k > 0)
    assert p.fallbacks >= 2 and blocks <= 6, sizes


def test_speculation_resumes_when_the_drafter_agrees_again() -> None:
    p = policy()
    for _ in range(10):
        step(p, agree=False)
    assert p.fallbacks == 1 and p.next_draft_size() == 0
    # The text gets easy: plain steps show the drafter picking the chosen tokens again.
    sizes = [step(p, agree=True) for _ in range(12)]
    first = next(i for i, k in enumerate(sizes) if k > 0)
    assert 0 < first <= 4 and sizes[first] == 1  # back within a few steps, from a short block
    grown = sizes[first:]
    assert all(k > 0 for k in grown) and grown == sorted(grown) and grown[-1] == 8  # growing as α does
    assert p.fallbacks == 1


def test_a_quick_relapse_doubles_the_wait_and_a_long_run_resets_it() -> None:
    p = policy()
    while p.fallbacks == 0:  # 2 plain steps, losing blocks: fall back, wait 4
        step(p, agree=False, signal=False)
    waits = []
    for _ in range(3):  # each blind probe fails at once: the wait doubles
        sizes = []
        while not sizes or sizes[-1] == 0:
            sizes.append(step(p, agree=False, signal=False))
        waits.append(len(sizes) - 1)
    assert waits == [4, 8, 16]
    # A probe that works: speculation runs for a while, then loses again -> wait back to 4.
    while p.next_draft_size() == 0:
        step(p, agree=False, signal=False)
    for _ in range(6):
        step(p, agree=True, signal=False)
    before = p.fallbacks
    while p.fallbacks == before:
        step(p, agree=False, signal=False)
    sizes = []
    while not sizes or sizes[-1] == 0:
        sizes.append(step(p, agree=False, signal=False))
    assert len(sizes) - 1 == 4


def test_rejection_shrinks_the_block_to_what_was_kept() -> None:
    p = policy()
    step(p, True), step(p, True)
    assert p.next_draft_size() == 4
    p.record_block(4, 2, DRAFT_S_PER_TOKEN * 4, VERIFY_S)
    assert p.next_draft_size() == 3 and p.fallbacks == 0


def test_an_expensive_drafter_is_not_used_even_when_it_agrees() -> None:
    p = policy()
    step(p, True), step(p, True)
    k = p.next_draft_size()
    # Drafting costs more per token than a whole plain step: no block size can win.
    p.record_block(k, k, 2 * PLAIN_S * k, VERIFY_S)
    assert p.fallbacks == 1 and p.best_block() == 0 and p.next_draft_size() == 0


def test_plain_steps_keep_the_plain_cost_current() -> None:
    p = policy()
    p.record_plain(0.5)  # prefill step: ignored
    p.record_plain(0.010)
    p.record_plain(0.020)
    assert p.plain_seconds is not None and 0.010 < p.plain_seconds < 0.020
