"""The EFT extras of OpenAI-compatible responses, beside OpenAI's own fields.

Owns their shapes: a model card's `eft` (the recipe: base, experts, reference, default weights, as
gRPC's `ListRecipes` says), `usage.eft.choices[i]` (a choice's server-side timing and speculation
counts) and the per-token `model_logprobs` (each model's logprob of the token, with
`return_model_logprobs`; with logprobs asked too, `model_top_logprobs`: each model's own most likely
tokens there, shaped in `openai_views`). The playground page reads all of them. Knows nothing of HTTP or Ray.
"""

from __future__ import annotations

import math
from typing import Any

from eft_serve.config import RecipeConfig
from eft_serve.coordinator.request import TokenOutput, Usage

# JSON has no -inf: OpenAI-compatible servers report an impossible token with this floor instead.
LOGPROB_FLOOR = -9999.0


def json_logprob(x: float | None) -> float:
    return LOGPROB_FLOOR if x is None or not math.isfinite(x) else max(float(x), LOGPROB_FLOOR)


def recipe_card(recipe: RecipeConfig) -> dict[str, Any]:
    return {
        "base": recipe.base,
        "experts": list(recipe.experts),
        "reference": recipe.reference,
        "default_weights": dict(recipe.default_weights),
    }


def choice_stats(u: Usage) -> dict[str, float]:
    s = u.speculation
    return {
        "time_to_first_token_ms": round(u.time_to_first_token_ms, 3),
        "tokens_per_s": round(u.tokens_per_s, 3),
        "speculative_blocks": s.speculative_blocks,
        "drafted_tokens": s.drafted_tokens,
        "accepted_tokens": s.accepted_tokens,
    }


def model_logprobs(t: TokenOutput) -> dict[str, float]:
    return {role: json_logprob(v) for role, v in t.model_logprobs.items()}
