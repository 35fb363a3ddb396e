"""The sweep figures: knowledge and behaviour vs β (up-scaling), style shares vs λ (interpolation).

Owns figure layout only (matplotlib with the non-interactive Agg backend, so it runs headless);
it plots rows as `report` builds them. Knows nothing about the service.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from eft_serve.evaluation.tables import Row


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_beta(rows: Sequence[Row], path: Path | str, references: Mapping[str, float] | None = None) -> Path:
    """Knowledge and behaviour of `upscale` vs β; `references`: label → knowledge level to mark."""
    plt = _pyplot()
    xs = [r["beta"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(xs, [r["knowledge"] for r in rows], "o-", color="tab:blue", label="knowledge (fact correct)")
    ax.plot(xs, [r["behaviour"] for r in rows], "s-", color="tab:orange", label="behaviour (style A score)")
    ax.plot(xs, [r["style_b_share"] for r in rows], "^:", color="tab:green", label="style B share")
    for (label, level), style in zip((references or {}).items(), ("--", "-.", ":")):
        ax.axhline(level, color="grey", linestyle=style, linewidth=1, label=f"{label} knowledge")
    ax.set_xlabel("β (strength of the small fine-tune's behaviour delta)")
    ax.set_ylabel("share of held-out questions")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"Up-scaling vs β (greedy, {rows[0]['n'] if rows else 0} held-out questions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    return _save(fig, path)


def plot_lambda(rows: Sequence[Row], path: Path | str) -> Path:
    """Style A / B shares and behaviour scores of `interpolate` vs λ (weights 1 − λ, λ)."""
    plt = _pyplot()
    xs = [r["lambda"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(xs, [r["style_a_share"] for r in rows], "o-", color="tab:orange", label="style A share (expert A)")
    ax.plot(xs, [r["style_b_share"] for r in rows], "o-", color="tab:green", label="style B share (expert B)")
    ax.plot(xs, [r["behaviour"] for r in rows], "--", color="tab:orange", alpha=0.7, label="style A score")
    ax.plot(xs, [r["behaviour_b"] for r in rows], "--", color="tab:green", alpha=0.7, label="style B score")
    ax.plot(xs, [r["knowledge"] for r in rows], ":", color="tab:blue", label="knowledge")
    ax.set_xlabel("λ   (expert weights: small_ft 1 − λ, small_ft_b λ)")
    ax.set_ylabel("share of held-out questions")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"Behaviour interpolation vs λ (greedy, {rows[0]['n'] if rows else 0} held-out questions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    return _save(fig, path)


def _save(fig, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata: regenerating identical numbers gives an identical file (no timestamp).
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    fig.clear()
    _pyplot().close(fig)
    return path
