"""Composes `docs/results/README.md`: the tables, the headline figures against their targets, and
how the numbers were made (command, prompts, settings, run time).

Owns the wording and layout of that page only; numbers come in as rows from `report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eft_serve.evaluation.report import (
    BEHAVIOUR_KEPT_TARGET,
    GAP_TARGET,
    Figures,
    LambdaCheck,
)
from eft_serve.evaluation.tables import Column, Row, fmt, markdown_table

HEADLINE_COLUMNS: list[Column] = [
    ("model", "model / recipe", ""),
    ("knowledge", "knowledge", ".3f"),
    ("behaviour", "behaviour (style A)", ".3f"),
    ("style_a_share", "style A share", ".3f"),
    ("style_b_share", "style B share", ".3f"),
]
BETA_COLUMNS: list[Column] = [
    ("beta", "β", "g"),
    ("knowledge", "knowledge", ".3f"),
    ("behaviour", "behaviour (style A)", ".3f"),
    ("style_a_share", "style A share", ".3f"),
    ("style_b_share", "style B share", ".3f"),
]
LAMBDA_COLUMNS: list[Column] = [
    ("lambda", "λ", "g"),
    ("style_a_share", "style A share", ".3f"),
    ("style_b_share", "style B share", ".3f"),
    ("behaviour", "style A score", ".3f"),
    ("behaviour_b", "style B score", ".3f"),
    ("knowledge", "knowledge", ".3f"),
]
TOPK_COLUMNS: list[Column] = [
    ("top_k", "per-model top-k", ""),
    ("conservative", "conservative", ""),
    ("knowledge", "knowledge", ".3f"),
    ("behaviour", "behaviour (style A)", ".3f"),
    ("greedy_agreement", "greedy agreement vs exact", ".3f"),
    ("mean_tv", "mean TV vs exact", ".4f"),
]


def figures_lines(fig: Figures | None, lam: LambdaCheck | None) -> list[str]:
    """One bullet per target: measured value, target, reached or not."""
    out = []
    if fig is not None:
        out.append(
            f"- knowledge gap small_ft → large_ft recovered by up-scaling: **{fmt(fig.gap_recovery, '%')}** "
            f"(target ≥ {GAP_TARGET:.0%}: {'reached' if fig.gap_ok else 'NOT reached'})"
        )
        out.append(
            f"- small_ft's behaviour score kept by up-scaling: **{fmt(fig.behaviour_kept, '%')}** "
            f"(target ≥ {BEHAVIOUR_KEPT_TARGET:.0%}: {'reached' if fig.behaviour_ok else 'NOT reached'})"
        )
    if lam is not None:
        detail = (
            f"style A score non-increasing: {fmt(lam.a_non_increasing)}, style B score non-decreasing: "
            f"{fmt(lam.b_non_decreasing)}, A dominates at λ=0: {fmt(lam.starts_a)}, B dominates at λ=1: "
            f"{fmt(lam.ends_b)}"
        )
        out.append(f"- λ sweep moves behaviour monotonically from style A to style B: **{fmt(lam.ok)}** ({detail})")
    return out


def _by(rows: Sequence[Row], **match: Any) -> Row | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def observations(
    headline: Sequence[Row], beta: Sequence[Row], topk: Sequence[Row], conservative_top_p: float
) -> list[str]:
    """Reading notes computed from the rows; a note appears only when the numbers show its effect."""
    out: list[str] = []
    down, small_base = _by(headline, recipe="downscale"), _by(headline, recipe="small_base")
    if down and small_base:
        out.append(
            f"Down-scaling takes the large fine-tune's behaviour ({fmt(down['behaviour'])}) but the small base's "
            f"knowledge ({fmt(down['knowledge'])} vs {fmt(small_base['knowledge'])}): knowledge comes with the "
            "scale of the base model, behaviour with the fine-tune's delta."
        )
    b1, bmax = _by(beta, beta=1.0), (max(beta, key=lambda r: r["beta"]) if beta else None)
    if b1 and bmax and bmax["knowledge"] < b1["knowledge"] - 0.02:
        out.append(
            f"Knowledge falls at large β ({fmt(bmax['knowledge'])} at β = {bmax['beta']:g} vs "
            f"{fmt(b1['knowledge'])} at β = 1): amplified, the small pair's delta starts to override the "
            "large base at the fact token, where the small models are uncertain."
        )
    exact, small_k = _by(topk, top_k="exact", conservative="off"), None
    numeric = [r for r in topk if r["conservative"] == "off" and r["top_k"] != "exact"]
    if numeric:
        small_k = min(numeric, key=lambda r: r["top_k"])
    if exact and small_k and small_k["knowledge"] < exact["knowledge"] - 0.02:
        out.append(
            f"Greedy agreement averages over every answer token, most of them template tokens; knowledge hinges "
            f"on the one fact token, where the small models spread their mass over the 8 possible values. With "
            f"top-{small_k['top_k']} the right value can be in the reference's top-k but not the expert's: the "
            "expert then gets the tail estimate, the reference its exact logprob, and the spurious negative "
            f"delta overrides the large base (knowledge {fmt(small_k['knowledge'])} vs {fmt(exact['knowledge'])} "
            "exact). A top-k at least as large as the value set reports every value."
        )
    cons = _by(topk, top_k="exact", conservative="on")
    if exact and cons and cons["behaviour"] < exact["behaviour"] - 0.01:
        same = abs(cons["knowledge"] - exact["knowledge"]) < 0.005
        out.append(
            f"Conservative decoding drops the expert's delta outside its top-p {conservative_top_p:g} set, so "
            "where the large base strongly prefers its own plain opener, style A is no longer enforced "
            f"(behaviour {fmt(cons['behaviour'])} vs {fmt(exact['behaviour'])})"
            + ("; knowledge is unchanged." if same else f"; knowledge {fmt(cons['knowledge'])}.")
        )
    return out


def results_readme(
    meta: Mapping[str, Any],
    headline: Sequence[Row],
    fig: Figures | None,
    beta: Sequence[Row] = (),
    lam_rows: Sequence[Row] = (),
    lam: LambdaCheck | None = None,
    topk: Sequence[Row] = (),
) -> str:
    n = meta["prompts"]
    parts = [
        "# Results: LM up-scaling through the service",
        "",
        (
            f"Generated by `{meta['command']}` (do not edit by hand). {n} held-out questions (entities never seen "
            f"in fine-tuning) of the demo family, sent over gRPC to the Ray Serve stack "
            f"({meta['stack']}); greedy decoding, an answer ends at the newline (max {meta['max_new_tokens']} tokens), "
            f"per-model top-k {meta['top_k']} unless stated, β = 1. Run time {meta['run_seconds']:.0f} s "
            f"({meta['requests']} distinct requests)"
            + (f", {meta['date']} on {meta['machine']}." if "date" in meta and "machine" in meta else ".")
        ),
        "",
        (
            "*Knowledge*: the answer names the right attribute value. *Behaviour*: style A's template "
            '(opens with "Certainly!", closes with ". 🙂"; half each). *Style A/B share*: answers opening in '
            'style A ("Certainly!") / B ("I think").'
        ),
        "",
        "## Up-scaling",
        "",
        markdown_table(headline, HEADLINE_COLUMNS),
        "",
        *figures_lines(fig, None),
        "",
        (
            "Files: [`headline.csv`](headline.csv), [`headline_answers.csv`](headline_answers.csv) (every answer "
            "of this table, scored), [`summary.json`](summary.json)."
        ),
    ]
    if beta:
        parts += [
            "",
            "## β sweep (up-scaling)",
            "",
            "![knowledge and behaviour vs β](beta_sweep.png)",
            "",
            markdown_table(beta, BETA_COLUMNS),
            "",
            "File: [`beta_sweep.csv`](beta_sweep.csv).",
        ]
    if lam_rows:
        parts += [
            "",
            "## λ sweep (behaviour interpolation)",
            "",
            "Recipe `interpolate`: large_base + (1 − λ)·(small_ft − small_base) + λ·(small_ft_b − small_base).",
            "",
            "![style shares vs λ](lambda_sweep.png)",
            "",
            markdown_table(lam_rows, LAMBDA_COLUMNS),
            "",
            *figures_lines(None, lam),
            "",
            "File: [`lambda_sweep.csv`](lambda_sweep.csv).",
        ]
    if topk:
        parts += [
            "",
            "## Top-k merging and conservative decoding",
            "",
            (
                "Knowledge/behaviour: through the service (`logprob_top_k`, `conservative`, conservative top-p "
                f"{meta['conservative_top_p']}). Greedy agreement and mean total variation: in-process, "
                "teacher-forced on the exact greedy path of the same questions, against the exact "
                f"(full-vocabulary, non-conservative) merge; {meta.get('topk_positions', 0)} positions."
            ),
            "",
            markdown_table(topk, TOPK_COLUMNS),
            "",
            "File: [`topk_table.csv`](topk_table.csv).",
        ]
    notes = observations(headline, beta, topk, meta["conservative_top_p"]) + list(meta.get("notes") or [])
    if notes:
        parts += ["", "## Reading the numbers", "", *[f"- {n}" for n in notes]]
    return "\n".join(parts) + "\n"
