"""Request validation: a client's request, checked against the server's limits, becomes a plan.

Owns every check that needs no model call — recipe and its knobs, per-model logprob truncation,
sampling parameters, timeout, prompt encoding and context length — and the records the decode
loop and `Score` run from (`GenerationPlan`, `ScorePlan`). Every problem raises an `EftError`
with a message saying what to change, before any pool is asked anything. Knows nothing of
pools, caches or transports. An unknown recipe is NOT_FOUND (the named thing does not exist),
on every path.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from eft_serve.config import CoordinatorConfig, RecipeConfig
from eft_serve.coordinator.request import GenerationRequest, MergeOptions, SpeculativeOptions
from eft_serve.core.recipe import ResolvedRecipe, resolve_recipe
from eft_serve.core.sampling import SamplingParams
from eft_serve.errors import InvalidArgument


@dataclass(frozen=True)
class MergePlan:
    recipe: ResolvedRecipe
    logprob_top_k: int  # per-model truncation on the pool wire; 0 = exact full vocabulary
    conservative_top_p: float | None  # None = conservative decoding off


@dataclass(frozen=True)
class SpeculationPlan:
    drafter: str  # pool role that drafts (greedily)
    max_draft_tokens: int
    adaptive: bool
    acceptance: Literal["coupled", "rejection"]


@dataclass(frozen=True)
class GenerationPlan:
    merge: MergePlan
    sampling: SamplingParams
    prompt_ids: list[int]
    deadline: float  # unix seconds
    sequence_id: str  # routing/KV-affinity hint sent with every pool call of this stream
    return_logprobs: bool
    return_model_logprobs: bool
    speculation: SpeculationPlan | None = None  # None = token by token


@dataclass(frozen=True)
class ScorePlan:
    merge: MergePlan
    prompt_ids: list[int]
    continuation_ids: list[int]
    deadline: float


@dataclass(frozen=True)
class ModelLimits:
    """What the pools fixed at start-up and every request is checked against."""

    vocab_size: int
    max_context: int


class RequestValidator:
    def __init__(
        self,
        recipes: Mapping[str, RecipeConfig],
        config: CoordinatorConfig,
        tokenizer: Any,
        limits: ModelLimits,
    ) -> None:
        self._recipes = recipes
        self._cfg = config
        self._tok = tokenizer
        self.limits = limits

    # ---- pieces ------------------------------------------------------------------------

    def merge_plan(self, merge: MergeOptions) -> MergePlan:
        recipe = resolve_recipe(
            self._recipes, merge.recipe or self._cfg.default_recipe, merge.beta, merge.expert_weights
        )
        top_k = self._cfg.default_logprob_top_k if merge.logprob_top_k is None else merge.logprob_top_k
        if top_k < 0 or top_k > self._cfg.max_logprob_top_k:
            raise InvalidArgument(
                f"logprob_top_k must be 0 (exact) or in [1, {self._cfg.max_logprob_top_k}], got {top_k}"
            )
        conservative: float | None = None
        if merge.conservative:
            conservative = (
                self._cfg.conservative_top_p if merge.conservative_top_p is None else merge.conservative_top_p
            )
            if not math.isfinite(conservative) or not 0.0 < conservative <= 1.0:
                raise InvalidArgument(f"conservative_top_p must be in (0, 1], got {conservative}")
        return MergePlan(recipe=recipe, logprob_top_k=top_k, conservative_top_p=conservative)

    def deadline(self, timeout_s: float | None) -> float:
        timeout = self._cfg.default_timeout_s if not timeout_s else float(timeout_s)
        if not math.isfinite(timeout) or timeout <= 0:
            raise InvalidArgument(f"timeout_s must be a positive number of seconds, got {timeout_s}")
        return time.time() + timeout

    def encode(self, text: str, what: str = "prompt") -> list[int]:
        if not text:
            raise InvalidArgument(f"{what} is empty; send at least one character of text")
        ids = list(self._tok.encode(text))
        if not ids:
            raise InvalidArgument(f"{what} encodes to zero tokens")
        return ids

    def sampling(self, req: GenerationRequest) -> SamplingParams:
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=int(req.top_k),
            seed=int(seed),
            max_new_tokens=(
                self._cfg.default_max_new_tokens if req.max_new_tokens is None else int(req.max_new_tokens)
            ),
            stop=tuple(req.stop),
            ignore_eos=req.ignore_eos,
        )
        params.validate(self._cfg.max_new_tokens_cap, self._cfg.max_stop_strings)
        return params

    def speculation(self, options: SpeculativeOptions, merge: MergePlan) -> SpeculationPlan | None:
        cfg = self._cfg.speculative
        max_k = cfg.max_draft_tokens if options.max_draft_tokens is None else options.max_draft_tokens
        if not 1 <= max_k <= cfg.max_draft_tokens:
            raise InvalidArgument(f"speculative.max_draft_tokens must be in [1, {cfg.max_draft_tokens}], got {max_k}")
        if not (cfg.enabled if options.enabled is None else options.enabled):
            return None
        drafter = cfg.drafter
        if drafter == "expert":
            experts = [role for role, weight in merge.recipe.experts if weight != 0.0]
            if not experts:
                return None  # a single model, or every expert weighted 0: nothing to draft with
            drafter = experts[0]
        return SpeculationPlan(
            drafter=drafter,
            max_draft_tokens=max_k,
            adaptive=cfg.adaptive if options.adaptive is None else options.adaptive,
            acceptance=cfg.acceptance,
        )

    # ---- whole requests ----------------------------------------------------------------

    def generation(self, req: GenerationRequest) -> GenerationPlan:
        merge = self.merge_plan(req.merge)
        sampling = self.sampling(req)
        deadline = self.deadline(req.timeout_s)
        prompt_ids = self.encode(req.prompt)
        limit = self.limits.max_context
        if len(prompt_ids) >= limit:
            raise InvalidArgument(
                f"prompt is {len(prompt_ids)} tokens but the models' context length is {limit}; "
                f"shorten it to at most {limit - 1} tokens"
            )
        return GenerationPlan(
            merge=merge,
            sampling=sampling,
            prompt_ids=prompt_ids,
            deadline=deadline,
            sequence_id=req.request_id or secrets.token_hex(8),
            return_logprobs=req.return_logprobs,
            return_model_logprobs=req.return_model_logprobs,
            speculation=self.speculation(req.speculative, merge),
        )

    def score(self, prompt: str, continuation: str, merge: MergeOptions, timeout_s: float | None) -> ScorePlan:
        merge_plan = self.merge_plan(merge)
        prompt_ids = self.encode(prompt)
        cont_ids = self.encode(continuation, "continuation")
        total = len(prompt_ids) + len(cont_ids)
        if total > self.limits.max_context:
            raise InvalidArgument(
                f"prompt + continuation is {total} tokens; the models' context length is {self.limits.max_context}"
            )
        return ScorePlan(
            merge=merge_plan, prompt_ids=prompt_ids, continuation_ids=cont_ids, deadline=self.deadline(timeout_s)
        )
