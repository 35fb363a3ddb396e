"""What the evaluation asks the service: named request settings ("conditions") and the sweeps.

Owns the experiment design: the recipes compared head to head, the β grid of the up-scaling sweep,
the λ grid of the behaviour interpolation (expert weights {small_ft: 1 − λ, small_ft_b: λ}) and
the top-k × conservative grid. Every condition states its merge settings explicitly (β, top-k),
so the numbers do not depend on a server's defaults, and identical settings are sent only once.
Knows nothing about transports or scoring.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The coordinator's default per-model top-k; the headline and sweep numbers use it explicitly.
DEFAULT_TOP_K = 20
BETAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
LAMBDAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
TOP_KS: tuple[int, ...] = (5, 20, 100, 0)  # 0 = exact full vocabulary
EXPERT_A, EXPERT_B = "small_ft", "small_ft_b"

# (recipe, label) of the head-to-head table, in print order.
HEADLINE: tuple[tuple[str, str], ...] = (
    ("small_base", "small base (reference)"),
    ("small_ft", "small fine-tuned"),
    ("large_base", "large base"),
    ("large_ft", "large fine-tuned (ground truth)"),
    ("upscale", "up-scaled: large_base + small_ft − small_base"),
    ("downscale", "down-scaled: small_base + large_ft − large_base"),
)


@dataclass(frozen=True)
class Condition:
    """One request setting, sent for every question."""

    name: str
    recipe: str
    beta: float = 1.0
    expert_weights: Mapping[str, float] = field(default_factory=dict)
    conservative: bool = False
    logprob_top_k: int = DEFAULT_TOP_K

    def key(self) -> tuple:
        """Identity of what is sent: conditions with equal keys share one run."""
        return (
            self.recipe,
            float(self.beta),
            tuple(sorted(self.expert_weights.items())),
            self.conservative,
            self.logprob_top_k,
        )

    def request_params(self) -> dict[str, Any]:
        """Merge keyword arguments for `EftClient.generate` (sampling is the runner's)."""
        return {
            "recipe": self.recipe,
            "beta": self.beta,
            "expert_weights": dict(self.expert_weights),
            "conservative": self.conservative,
            "logprob_top_k": self.logprob_top_k,
        }


def headline_conditions() -> list[Condition]:
    return [Condition(name=recipe, recipe=recipe) for recipe, _ in HEADLINE]


def beta_name(beta: float) -> str:
    return f"upscale β={beta:g}"


def beta_sweep(betas: Iterable[float] = BETAS) -> list[Condition]:
    return [Condition(name=beta_name(b), recipe="upscale", beta=float(b)) for b in betas]


def lambda_name(lam: float) -> str:
    return f"interpolate λ={lam:g}"


def lambda_weights(lam: float) -> dict[str, float]:
    # Rounded so that 1 − 0.7 is sent as 0.3, not 0.30000000000000004 (keys, cache, CSV).
    return {EXPERT_A: round(1.0 - lam, 10), EXPERT_B: round(lam, 10)}


def lambda_sweep(lambdas: Iterable[float] = LAMBDAS) -> list[Condition]:
    return [
        Condition(name=lambda_name(lam), recipe="interpolate", expert_weights=lambda_weights(lam)) for lam in lambdas
    ]


def topk_name(k: int, conservative: bool) -> str:
    return f"upscale top-k={'exact' if k == 0 else k}{' conservative' if conservative else ''}"


def topk_grid(ks: Iterable[int] = TOP_KS) -> list[Condition]:
    return [
        Condition(name=topk_name(k, c), recipe="upscale", conservative=c, logprob_top_k=int(k))
        for c in (False, True)
        for k in ks
    ]


def available(conditions: Iterable[Condition], recipes: Iterable[str]) -> tuple[list[Condition], list[Condition]]:
    """Split into (served, skipped) by the recipes a server offers."""
    served = set(recipes)
    kept, skipped = [], []
    for c in conditions:
        (kept if c.recipe in served else skipped).append(c)
    return kept, skipped
