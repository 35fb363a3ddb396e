"""Request validation: a client's request, checked against the server's limits, becomes a plan.

Owns every check that needs no model call — recipe and its knobs, per-model logprob truncation,
sampling parameters, timeout, prompt encoding and context length — and the records the decode
loop and `Score` run from (`GenerationPlan`, `ScorePlan`). Every problem raises an `EftError`
with a message saying what to change, before any pool is asked anything. Knows nothing of
pools, caches or transports. An unknown recipe is NOT_FOUND (the named thing does not exist),
on every path; exact mode on a server that does not allow it is PERMISSION_DENIED.

Bounds, all checked before any costly work: the prompt's size in bytes before it is tokenized,
the number and length of stop strings, `top_logprobs` (alternatives per token, at most
`max_top_logprobs`), `timeout_s` (finite, > 0, at most `max_timeout_s`), the Score
continuation's length. The client's `request_id` is only echoed (a short id from a safe
set); the sequence id that keys pool KV caches and routing is always chosen here. Messages quote
user input only through `errors.clip`.

Chat requests (`messages`): roles checked, the same byte cap, then rendered once per model of the
recipe (and the drafter) with that pool's own tokenizer in the recipe's `prompt_format`
(`core.chat_format`); the plan keeps each role's prompt ids where they differ from the base's.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from eft_serve.config import CoordinatorConfig, PromptFormat, RecipeConfig
from eft_serve.coordinator.request import CHAT_ROLES, ChatMessage, GenerationRequest, MergeOptions, SpeculativeOptions
from eft_serve.core.chat_format import render_chat
from eft_serve.core.recipe import ResolvedRecipe, resolve_recipe
from eft_serve.core.sampling import SamplingParams
from eft_serve.errors import InvalidArgument, PermissionDenied, clip

# What a client's request_id may be: echoed in every response chunk, never used as a key.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{0,128}")


def check_request_id(request_id: str) -> str:
    """The client's request id unchanged, or INVALID_ARGUMENT when it is not a short safe id."""
    if not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise InvalidArgument(
            f"request_id must be at most 128 characters from [A-Za-z0-9._:-], got {len(request_id)} "
            f"characters starting {clip(request_id[:24])}"
        )
    return request_id


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
    # Alternatives reported per token from the merged distribution (0 = none; > 0 implies return_logprobs).
    top_logprobs: int = 0
    # Chat prompts: each role's own prompt ids where they differ from `prompt_ids` (the base's);
    # a role not named here (every role, for a plain prompt) uses `prompt_ids`.
    role_prompt_ids: Mapping[str, list[int]] = field(default_factory=dict)

    def prompt_of(self, role: str) -> list[int]:
        return self.role_prompt_ids.get(role, self.prompt_ids)


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
        tokenizers: Mapping[str, Any] | None = None,
    ) -> None:
        self._recipes = recipes
        self._cfg = config
        self._tok = tokenizer
        # Each pool's own tokenizer (one vocabulary, but chat templates differ); roles not named
        # use `tokenizer`.
        self._tokenizers = dict(tokenizers or {})
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
        if top_k == 0 and not self._cfg.allow_exact_mode:
            raise PermissionDenied(
                "exact mode (logprob_top_k = 0) is turned off on this server; send logprob_top_k > 0 "
                f"(e.g. {self._cfg.default_logprob_top_k or 20})"
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
        """Absolute deadline of a request; None or 0 (proto default) = `default_timeout_s`."""
        timeout = self._cfg.default_timeout_s if timeout_s is None or timeout_s == 0 else float(timeout_s)
        if not math.isfinite(timeout) or timeout <= 0:
            raise InvalidArgument(f"timeout_s must be a finite positive number of seconds, got {timeout_s}")
        if timeout > self._cfg.max_timeout_s:
            raise InvalidArgument(
                f"timeout_s {timeout:g} exceeds this server's cap of {self._cfg.max_timeout_s:g} seconds; ask for less"
            )
        return time.time() + timeout

    def check_size(self, text: str, what: str = "prompt") -> None:
        """INVALID_ARGUMENT when `text` is over `max_prompt_bytes` (UTF-8), before any tokenizing."""
        cap = self._cfg.max_prompt_bytes
        # len(text) <= UTF-8 bytes <= 4 * len(text): only the middle range needs the encoding.
        if len(text) > cap or (4 * len(text) > cap and len(text.encode("utf-8", "surrogatepass")) > cap):
            raise InvalidArgument(f"{what} is over this server's limit of {cap} bytes (UTF-8); shorten it")

    def encode(self, text: str, what: str = "prompt") -> list[int]:
        if not text:
            raise InvalidArgument(f"{what} is empty; send at least one character of text")
        self.check_size(text, what)
        ids = list(self._tok.encode(text))
        if not ids:
            raise InvalidArgument(f"{what} encodes to zero tokens")
        return ids

    def stop_strings(self, stop: tuple[str, ...]) -> tuple[str, ...]:
        """INVALID_ARGUMENT for too many or too long stop strings (checked before they are used)."""
        if len(stop) > self._cfg.max_stop_strings:
            raise InvalidArgument(f"at most {self._cfg.max_stop_strings} stop strings are allowed, got {len(stop)}")
        cap = self._cfg.max_stop_string_chars
        for i, s in enumerate(stop):
            if len(s) > cap:
                raise InvalidArgument(f"stop string {i} is {len(s)} characters; at most {cap} are allowed")
        return stop

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
            stop=self.stop_strings(tuple(req.stop)),
            ignore_eos=req.ignore_eos,
        )
        params.validate(self._cfg.max_new_tokens_cap, self._cfg.max_stop_strings)
        return params

    def top_logprobs(self, n: int) -> int:
        """INVALID_ARGUMENT unless 0 <= n <= `max_top_logprobs` (alternatives per generated token)."""
        cap = self._cfg.max_top_logprobs
        if not 0 <= n <= cap:
            raise InvalidArgument(f"top_logprobs must be in [0, {cap}] (alternatives per generated token), got {n}")
        return n

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

    def prompts(
        self, req: GenerationRequest, merge: MergePlan, speculation: SpeculationPlan | None
    ) -> tuple[list[int], dict[str, list[int]]]:
        """The base's prompt ids, and every other role's where they differ (chat prompts only)."""
        if not req.messages:
            return self.encode(req.prompt), {}
        if req.prompt:
            raise InvalidArgument("send either prompt or messages, not both (put the text in a user message)")
        check_messages(req.messages)
        # The prompt byte cap holds for a chat too (each message counts 16 bytes of framing more,
        # so a flood of empty messages cannot make rendering expensive).
        cap = self._cfg.max_prompt_bytes
        size = sum(len(m.content.encode("utf-8", "surrogatepass")) + 16 for m in req.messages)
        if size > cap:
            raise InvalidArgument(
                f"messages are {size} bytes (UTF-8, 16 per message for framing), over this server's limit "
                f"of {cap}; shorten or drop some"
            )
        formats = self._recipes[merge.recipe.name].prompt_format
        roles = list(merge.recipe.roles)
        if speculation is not None and speculation.drafter not in roles:
            roles.append(speculation.drafter)  # the drafter drafts from its own prefix
        ids = {role: self.render(req.messages, role, formats.get(role, "own")) for role in roles}
        base = ids[merge.recipe.base]
        return base, {role: r for role, r in ids.items() if r != base}

    def render(self, messages: tuple[ChatMessage, ...], role: str, fmt: PromptFormat) -> list[int]:
        """One role's prompt ids for a chat request, in the recipe's format for that role."""
        tokenizer = self._tokenizers.get(role, self._tok)
        try:
            if isinstance(fmt, str):
                ids = render_chat(messages, fmt, tokenizer)
            else:
                ids = render_chat(messages, "template", tokenizer, fmt.template)
        except ValueError as e:
            # The reason comes from the template (raise_exception) or Jinja: bounded, never the prompt.
            raise InvalidArgument(f"messages cannot be rendered for model {role!r}: {str(e)[:200]}") from e
        if not ids:
            raise InvalidArgument(f"messages render to zero tokens for model {role!r}")
        return ids

    # ---- whole requests ----------------------------------------------------------------

    def generation(self, req: GenerationRequest) -> GenerationPlan:
        check_request_id(req.request_id)
        merge = self.merge_plan(req.merge)
        sampling = self.sampling(req)
        top_logprobs = self.top_logprobs(req.top_logprobs)
        deadline = self.deadline(req.timeout_s)
        speculation = self.speculation(req.speculative, merge)
        prompt_ids, role_prompt_ids = self.prompts(req, merge, speculation)
        # Every model's prefix grows by the same generated tokens: the longest prompt is the limit.
        longest = max(len(ids) for ids in (prompt_ids, *role_prompt_ids.values()))
        limit = self.limits.max_context
        if longest >= limit:
            raise InvalidArgument(
                f"prompt is {longest} tokens but the models' context length is {limit}; "
                f"shorten it to at most {limit - 1} tokens"
            )
        return GenerationPlan(
            merge=merge,
            sampling=sampling,
            prompt_ids=prompt_ids,
            deadline=deadline,
            # Server-chosen: the key of every pool's KV cache and routing for this stream. The
            # client's request_id is only echoed (it could collide or be chosen to).
            sequence_id=secrets.token_hex(12),
            return_logprobs=req.return_logprobs or top_logprobs > 0,
            return_model_logprobs=req.return_model_logprobs,
            top_logprobs=top_logprobs,
            speculation=speculation,
            role_prompt_ids=role_prompt_ids,
        )

    def score(self, prompt: str, continuation: str, merge: MergeOptions, timeout_s: float | None) -> ScorePlan:
        merge_plan = self.merge_plan(merge)
        deadline = self.deadline(timeout_s)
        # Both sizes before either is tokenized: a huge continuation costs nothing either.
        self.check_size(prompt)
        self.check_size(continuation, "continuation")
        prompt_ids = self.encode(prompt)
        cont_ids = self.encode(continuation, "continuation")
        cap = self._cfg.max_score_continuation_tokens
        if len(cont_ids) > cap:
            raise InvalidArgument(
                f"continuation is {len(cont_ids)} tokens; this server scores at most {cap} per request "
                "(split it into several Score calls)"
            )
        total = len(prompt_ids) + len(cont_ids)
        if total > self.limits.max_context:
            raise InvalidArgument(
                f"prompt + continuation is {total} tokens; the models' context length is {self.limits.max_context}"
            )
        return ScorePlan(merge=merge_plan, prompt_ids=prompt_ids, continuation_ids=cont_ids, deadline=deadline)


def check_messages(messages: tuple[ChatMessage, ...]) -> None:
    """INVALID_ARGUMENT unless every message has a known role and text content."""
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{i}].role is {clip(m.role)}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m.content, str):
            raise InvalidArgument(f"messages[{i}].content must be text")
