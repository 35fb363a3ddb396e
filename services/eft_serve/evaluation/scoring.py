"""Scoring answers of the demo world and aggregating them: knowledge, behaviour, derived figures.

Owns the definitions the results report: *knowledge* (the fact in the answer is the right one),
*behaviour* (how closely the answer follows style A's template, in [0, 1]), style shares, the
share of a knowledge gap a method recovers, the share of a behaviour score it keeps, and the
monotonicity check of a sweep. Pure Python; knows nothing about models, services or files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from eft_serve.demo.world import Question, World, style_of, style_score


@dataclass(frozen=True)
class AnswerScore:
    """One generated answer, scored."""

    correct: bool  # the first value of the asked attribute named in the answer is the right one
    behaviour_a: float  # style A template followed: opener + closer, half each
    behaviour_b: float  # the same for style B
    style: str  # "a" | "b" | "plain": which style the answer opens with


def score_answer(question: Question, text: str) -> AnswerScore:
    return AnswerScore(
        correct=World.is_correct(question, text),
        behaviour_a=style_score(text, "a"),
        behaviour_b=style_score(text, "b"),
        style=style_of(text),
    )


@dataclass(frozen=True)
class Aggregate:
    """Means over the answers of one condition (all in [0, 1])."""

    n: int
    knowledge: float
    behaviour: float  # style A behaviour score: what the fine-tune (expert A) is for
    behaviour_b: float
    share_a: float
    share_b: float
    share_plain: float


def aggregate(scores: Iterable[AnswerScore]) -> Aggregate:
    s = list(scores)
    n = len(s)
    if n == 0:
        nan = float("nan")
        return Aggregate(0, nan, nan, nan, nan, nan, nan)
    return Aggregate(
        n=n,
        knowledge=sum(x.correct for x in s) / n,
        behaviour=sum(x.behaviour_a for x in s) / n,
        behaviour_b=sum(x.behaviour_b for x in s) / n,
        share_a=sum(x.style == "a" for x in s) / n,
        share_b=sum(x.style == "b" for x in s) / n,
        share_plain=sum(x.style == "plain" for x in s) / n,
    )


def gap_recovery(low: float, high: float, value: float) -> float:
    """Share of the gap low → high that `value` closes: (value − low) / (high − low).

    NaN when there is no gap to close (high ≤ low): a ratio over a non-positive gap means nothing.
    """
    gap = high - low
    if not gap > 0:
        return float("nan")
    return (value - low) / gap


def kept_share(reference: float, value: float) -> float:
    """Share of `reference` that `value` keeps (value / reference); NaN for a zero reference."""
    if not reference > 0:
        return float("nan")
    return value / reference


def is_monotonic(values: Sequence[float], increasing: bool, tolerance: float = 0.0) -> bool:
    """True when each step moves the right way (or stays within `tolerance` of flat)."""
    steps = [b - a for a, b in pairwise(values)]
    if any(math.isnan(v) for v in values):
        return False
    return all(d >= -tolerance for d in steps) if increasing else all(d <= tolerance for d in steps)


def meets(value: float, threshold: float) -> bool:
    """`value ≥ threshold`, NaN never meets (rounded to 1e-9 so 0.9 of 0.9 counts)."""
    return not math.isnan(value) and value >= threshold - 1e-9
