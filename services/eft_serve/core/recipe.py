"""Per-request recipe resolution: which models take part and with which weights.

Owns turning a configured recipe plus request knobs (β, per-expert weights) into the concrete
linear combination `Σ_i w_i · log p_i`. Knows nothing about where the logprobs come from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from eft_serve.errors import InvalidArgument, NotFound, clip


class RecipeDefinition(Protocol):
    """A configured recipe as the core sees it (`config.RecipeConfig` is one): no pydantic here."""

    @property
    def base(self) -> str: ...
    @property
    def experts(self) -> Sequence[str]: ...
    @property
    def reference(self) -> str | None: ...
    @property
    def default_weights(self) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class ResolvedRecipe:
    name: str
    base: str
    # (expert role, weight) — weight already includes β.
    experts: tuple[tuple[str, float], ...]
    reference: str | None

    @property
    def roles(self) -> tuple[str, ...]:
        """Every model queried, each once."""
        seen: dict[str, None] = {self.base: None}
        for role, _ in self.experts:
            seen[role] = None
        if self.reference:
            seen[self.reference] = None
        return tuple(seen)

    def coefficients(self) -> dict[str, float]:
        """Net weight per model: base 1, experts w_j, reference −Σ w_j (summed where roles repeat)."""
        coef: dict[str, float] = {self.base: 1.0}
        for role, w in self.experts:
            coef[role] = coef.get(role, 0.0) + w
        if self.reference:
            coef[self.reference] = coef.get(self.reference, 0.0) - sum(w for _, w in self.experts)
        return coef


def resolve_recipe(
    recipes: Mapping[str, RecipeDefinition],
    name: str,
    beta: float | None = None,
    expert_weights: Mapping[str, float] | None = None,
) -> ResolvedRecipe:
    if name not in recipes:
        raise NotFound(f"unknown recipe {clip(name)}; available recipes: {', '.join(sorted(recipes))}")
    recipe = recipes[name]
    beta = 1.0 if beta is None else float(beta)
    if not math.isfinite(beta):
        raise InvalidArgument(f"beta must be a finite number, got {beta}")
    expert_weights = dict(expert_weights or {})
    unknown = sorted(set(expert_weights) - set(recipe.experts))
    if unknown:
        raise InvalidArgument(
            f"expert_weights names {clip(sorted(unknown))}, which are not experts of recipe {name!r} "
            f"(its experts: {recipe.experts or 'none'})"
        )
    for role, w in expert_weights.items():
        if not math.isfinite(w):
            raise InvalidArgument(f"weight of expert {role!r} must be finite, got {w}")
    experts = tuple(
        (role, beta * float(expert_weights.get(role, recipe.default_weights.get(role, 1.0)))) for role in recipe.experts
    )
    return ResolvedRecipe(name=name, base=recipe.base, experts=experts, reference=recipe.reference)
