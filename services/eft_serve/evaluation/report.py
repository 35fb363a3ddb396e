"""From answers to results: per-condition aggregates, the table rows and the headline figures.

Owns what each results table holds (columns, order) and the targets the figures are checked
against: up-scaling recovers ≥ 90 % of the small_ft → large_ft knowledge gap while keeping
≥ 95 % of small_ft's behaviour score; the λ sweep moves behaviour monotonically from expert A's
style to expert B's. Knows nothing about how answers were produced or how tables are written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eft_serve.demo.world import Question
from eft_serve.evaluation import conditions as cond
from eft_serve.evaluation.scoring import (
    Aggregate,
    aggregate,
    gap_recovery,
    is_monotonic,
    kept_share,
    meets,
    score_answer,
)
from eft_serve.evaluation.topk_accuracy import AccuracyRow

GAP_TARGET = 0.90
BEHAVIOUR_KEPT_TARGET = 0.95

Row = dict[str, Any]


def aggregates(questions: Sequence[Question], answers: Mapping[str, Sequence[str]]) -> dict[str, Aggregate]:
    """Condition name → aggregate scores over its answers (aligned with `questions`)."""
    return {name: aggregate(score_answer(q, t) for q, t in zip(questions, texts)) for name, texts in answers.items()}


def _scores(a: Aggregate) -> Row:
    return {
        "n": a.n,
        "knowledge": a.knowledge,
        "behaviour": a.behaviour,
        "style_a_share": a.share_a,
        "style_b_share": a.share_b,
        "plain_share": a.share_plain,
    }


def headline_rows(aggs: Mapping[str, Aggregate]) -> list[Row]:
    return [
        {"recipe": recipe, "model": label, **_scores(aggs[recipe])} for recipe, label in cond.HEADLINE if recipe in aggs
    ]


@dataclass(frozen=True)
class Figures:
    """The headline figures and whether each reaches its target."""

    gap_recovery: float  # (upscale − small_ft) / (large_ft − small_ft), knowledge
    behaviour_kept: float  # upscale behaviour / small_ft behaviour
    gap_ok: bool
    behaviour_ok: bool

    def as_dict(self) -> Row:
        return {
            "gap_recovery": self.gap_recovery,
            "gap_target": GAP_TARGET,
            "gap_ok": self.gap_ok,
            "behaviour_kept": self.behaviour_kept,
            "behaviour_kept_target": BEHAVIOUR_KEPT_TARGET,
            "behaviour_ok": self.behaviour_ok,
        }


def figures(aggs: Mapping[str, Aggregate]) -> Figures | None:
    """None when a run lacks one of small_ft, large_ft, upscale (e.g. a server without large_ft)."""
    if not {"small_ft", "large_ft", "upscale"} <= set(aggs):
        return None
    small, large, up = aggs["small_ft"], aggs["large_ft"], aggs["upscale"]
    gap = gap_recovery(small.knowledge, large.knowledge, up.knowledge)
    kept = kept_share(small.behaviour, up.behaviour)
    return Figures(gap, kept, meets(gap, GAP_TARGET), meets(kept, BEHAVIOUR_KEPT_TARGET))


def beta_rows(aggs: Mapping[str, Aggregate], betas: Sequence[float] = cond.BETAS) -> list[Row]:
    return [{"beta": b, **_scores(aggs[cond.beta_name(b)])} for b in betas if cond.beta_name(b) in aggs]


def lambda_rows(aggs: Mapping[str, Aggregate], lambdas: Sequence[float] = cond.LAMBDAS) -> list[Row]:
    rows = []
    for lam in lambdas:
        a = aggs.get(cond.lambda_name(lam))
        if a is not None:
            w = cond.lambda_weights(lam)
            rows.append(
                {
                    "lambda": lam,
                    "w_small_ft": w[cond.EXPERT_A],
                    "w_small_ft_b": w[cond.EXPERT_B],
                    **_scores(a),
                    "behaviour_b": a.behaviour_b,
                }
            )
    return rows


@dataclass(frozen=True)
class LambdaCheck:
    """Does behaviour move monotonically from expert A's style (λ = 0) to expert B's (λ = 1)?"""

    a_non_increasing: bool  # style A behaviour score never rises with λ
    b_non_decreasing: bool  # style B behaviour score never falls with λ
    starts_a: bool  # at λ = 0 style A dominates
    ends_b: bool  # at λ = 1 style B dominates

    @property
    def ok(self) -> bool:
        return self.a_non_increasing and self.b_non_decreasing and self.starts_a and self.ends_b

    def as_dict(self) -> Row:
        return {
            "a_non_increasing": self.a_non_increasing,
            "b_non_decreasing": self.b_non_decreasing,
            "starts_a": self.starts_a,
            "ends_b": self.ends_b,
            "monotonic_a_to_b": self.ok,
        }


def lambda_check(rows: Sequence[Row]) -> LambdaCheck | None:
    if len(rows) < 2:
        return None
    rows = sorted(rows, key=lambda r: r["lambda"])
    return LambdaCheck(
        a_non_increasing=is_monotonic([r["behaviour"] for r in rows], increasing=False),
        b_non_decreasing=is_monotonic([r["behaviour_b"] for r in rows], increasing=True),
        starts_a=rows[0]["style_a_share"] > rows[0]["style_b_share"],
        ends_b=rows[-1]["style_b_share"] > rows[-1]["style_a_share"],
    )


def topk_rows(
    aggs: Mapping[str, Aggregate], accuracy: Sequence[AccuracyRow], ks: Sequence[int] = cond.TOP_KS
) -> list[Row]:
    """One row per (conservative, k): scores through the service + in-process agreement / TV."""
    acc = {(r.top_k, r.conservative): r for r in accuracy}
    rows = []
    for conservative in (False, True):
        for k in ks:
            a = aggs.get(cond.topk_name(k, conservative))
            r = acc.get((k, conservative))
            if a is None and r is None:
                continue
            rows.append(
                {
                    "top_k": "exact" if k == 0 else k,
                    "conservative": "on" if conservative else "off",
                    "knowledge": a.knowledge if a else float("nan"),
                    "behaviour": a.behaviour if a else float("nan"),
                    "greedy_agreement": r.agreement if r else float("nan"),
                    "mean_tv": r.mean_tv if r else float("nan"),
                    "positions": r.positions if r else 0,
                    "n": a.n if a else 0,
                }
            )
    return rows
