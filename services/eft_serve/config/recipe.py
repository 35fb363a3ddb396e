"""A recipe: the merge formula over pool roles, its default weights and per-role prompt formats.

Owns the recipe schema and its shape rules (experts need a reference, weights name experts).
Knows nothing of which pools exist: the whole tree checks that (`config.tree`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from eft_serve.core.chat_format import compile_template
from eft_serve.strict_model import StrictModel


class PromptTemplate(StrictModel):
    """A Jinja prompt template for chat requests (variables: see `eft_serve.core.chat_format`)."""

    template: str
    """Jinja template (variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`); it places its own special tokens."""

    @model_validator(mode="after")
    def _compiles(self) -> PromptTemplate:
        compile_template(self.template)  # ValueError naming the problem: fail at config load
        return self


# How one model of a recipe sees a chat request: "own" (its tokenizer's chat template, else the
# plain transcript), "plain" (the transcript "System: …\nUser: …\nAssistant:") or a template.
PromptFormat = Literal["own", "plain"] | PromptTemplate


class RecipeConfig(StrictModel):
    """score = log p_base + Σ_j w_j · (log p_expert_j − log p_reference), renormalised per token."""

    description: str = ""
    """One line shown by `eft recipes` and `ListRecipes`."""
    base: str
    """The pool whose logprobs the recipe starts from (the large base in up-scaling)."""
    experts: list[str] = Field(default_factory=list)
    """Pools whose difference to `reference` is added, each times its weight and β."""
    reference: str | None = None
    """The pool the experts are compared with (the small base in up-scaling)."""
    default_weights: dict[str, float] = Field(default_factory=dict)
    """Default expert weights before the per-request β scaling; experts not named default to 1."""
    prompt_format: dict[str, PromptFormat] = Field(default_factory=dict)
    """Chat requests only: the prompt format per role of the recipe; roles not named get "own"."""

    @model_validator(mode="after")
    def _shape(self) -> RecipeConfig:
        if self.experts and not self.reference:
            raise ValueError("a recipe with experts needs a reference model")
        if not self.experts and self.reference:
            raise ValueError("a reference without experts has no effect; drop it")
        unknown = set(self.default_weights) - set(self.experts)
        if unknown:
            raise ValueError(f"default_weights names non-experts: {sorted(unknown)}")
        for name, w in self.default_weights.items():
            if not math.isfinite(w):
                raise ValueError(f"default weight of {name} is not finite")
        strangers = set(self.prompt_format) - set(self.roles())
        if strangers:
            raise ValueError(f"prompt_format names roles outside the recipe: {sorted(strangers)}")
        return self

    def roles(self) -> list[str]:
        return [self.base, *self.experts, *([self.reference] if self.reference else [])]
