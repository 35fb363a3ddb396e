"""The coordinator proper: validate a request, then decode token by token and stream chunks.

Owns request validation against server limits, the startup vocabulary check, the decode loop
(fetch → merge → sample → detokenise → stop) and `Score`. Transport-neutral: pools arrive as
`PoolClient`s, the tokenizer as any HF tokenizer, the cache as any `ResultCache`.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

from eft_serve.config import CoordinatorConfig, RecipeConfig
from eft_serve.coordinator.fetch import FetchStats, StepFetcher
from eft_serve.coordinator.pool_client import PoolClient
from eft_serve.coordinator.request import (
    GenerationChunk, GenerationRequest, MergeOptions, ScoreResult, TokenOutput, Usage,
)
from eft_serve.core.detokenizer import IncrementalDetokenizer
from eft_serve.core.merge import MergedDistribution, merge_position
from eft_serve.core.recipe import ResolvedRecipe, resolve_recipe
from eft_serve.core.sampling import SamplingParams, choose_token
from eft_serve.core.stops import StopStringMatcher
from eft_serve.engine.types import ModelInfo, SequenceQuery
from eft_serve.errors import FailedPrecondition, InvalidArgument, Unavailable


@dataclass(frozen=True)
class _Plan:
    recipe: ResolvedRecipe
    top_k: int
    conservative_top_p: float | None
    sampling: SamplingParams
    prompt_ids: list[int]
    deadline: float
    use_cache: bool


class EftCoordinator:
    def __init__(
        self,
        pools: Mapping[str, PoolClient],
        recipes: Mapping[str, RecipeConfig],
        tokenizer: Any,
        config: CoordinatorConfig,
        cache: Any | None = None,
        cache_key_prefix: str = "eft:v1:",
        cache_recipes: Mapping[str, bool] | None = None,
    ) -> None:
        self._pools = dict(pools)
        self._recipes = dict(recipes)
        self._tok = tokenizer
        self._cfg = config
        self._cache = cache
        self._cache_prefix = cache_key_prefix
        self._cache_recipes = dict(cache_recipes or {})
        self.infos: dict[str, ModelInfo] = {}
        self._vocab_size = 0
        self._max_context = 0
        self._fetcher: StepFetcher | None = None

    # ---- startup -------------------------------------------------------------------------

    async def start(self) -> None:
        """Ask every pool for its identity and refuse to serve if vocabularies differ."""
        names = list(self._pools)
        answers = await asyncio.gather(*(self._pools[n].info() for n in names), return_exceptions=True)
        for name, a in zip(names, answers):
            if isinstance(a, BaseException):
                raise Unavailable(f"model pool {name!r} did not answer its info call: {a}") from a
        self.infos = dict(zip(names, answers))  # type: ignore[arg-type]
        check_shared_vocabulary(self.infos)
        # Fixed once the pools are known; read on every decoding step.
        self._vocab_size = next(iter(self.infos.values())).vocab_size
        self._max_context = min(i.max_context for i in self.infos.values())
        tok_vocab = len(self._tok)
        first = next(iter(self.infos.values()))
        if tok_vocab > first.vocab_size:
            raise FailedPrecondition(
                f"the coordinator's tokenizer has {tok_vocab} tokens but the models' vocabulary is "
                f"{first.vocab_size}; point the coordinator at the models' own tokenizer"
            )
        self._fetcher = StepFetcher(
            self._pools, self.infos, self._cfg.pool_call_timeout_s, self._cache, self._cache_prefix,
            retries=self._cfg.pool_call_retries,
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def default_recipe(self) -> str:
        return self._cfg.default_recipe

    @property
    def eos_token_id(self) -> int:
        return self.infos[self._recipes[self._cfg.default_recipe].base].eos_token_id

    # ---- validation ----------------------------------------------------------------------

    def _resolve_merge(self, merge: MergeOptions) -> tuple[ResolvedRecipe, int, float | None]:
        recipe_name = merge.recipe or self._cfg.default_recipe
        if recipe_name not in self._recipes:
            raise InvalidArgument(
                f"unknown recipe {recipe_name!r}; available recipes: {', '.join(sorted(self._recipes))}"
            )
        recipe = resolve_recipe(self._recipes, recipe_name, merge.beta, merge.expert_weights)
        top_k = self._cfg.default_logprob_top_k if merge.logprob_top_k is None else merge.logprob_top_k
        if top_k < 0 or top_k > self._cfg.max_logprob_top_k:
            raise InvalidArgument(
                f"logprob_top_k must be 0 (exact) or in [1, {self._cfg.max_logprob_top_k}], got {top_k}"
            )
        conservative: float | None = None
        if merge.conservative:
            conservative = self._cfg.conservative_top_p if merge.conservative_top_p is None else merge.conservative_top_p
            if not math.isfinite(conservative) or not 0.0 < conservative <= 1.0:
                raise InvalidArgument(f"conservative_top_p must be in (0, 1], got {conservative}")
        return recipe, top_k, conservative

    def _encode_prompt(self, prompt: str, what: str = "prompt") -> list[int]:
        if not prompt:
            raise InvalidArgument(f"{what} is empty; send at least one character of text")
        ids = list(self._tok.encode(prompt))
        if not ids:
            raise InvalidArgument(f"{what} encodes to zero tokens")
        return ids

    def _plan(self, req: GenerationRequest) -> _Plan:
        if not self.infos:
            raise Unavailable("the coordinator has not finished starting; retry shortly")
        recipe, top_k, conservative = self._resolve_merge(req.merge)
        cap = self._cfg.max_new_tokens_cap
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        sampling = SamplingParams(
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=int(req.top_k),
            seed=int(seed),
            max_new_tokens=self._cfg.default_max_new_tokens if req.max_new_tokens is None else int(req.max_new_tokens),
            stop=tuple(req.stop),
            ignore_eos=req.ignore_eos,
        )
        sampling.validate(cap, self._cfg.max_stop_strings)
        timeout = self._cfg.default_timeout_s if not req.timeout_s else float(req.timeout_s)
        if not math.isfinite(timeout) or timeout <= 0:
            raise InvalidArgument(f"timeout_s must be a positive number of seconds, got {req.timeout_s}")
        prompt_ids = self._encode_prompt(req.prompt)
        if len(prompt_ids) >= self.max_context:
            raise InvalidArgument(
                f"prompt is {len(prompt_ids)} tokens but the models' context length is {self.max_context}; "
                f"shorten it to at most {self.max_context - 1} tokens"
            )
        return _Plan(recipe, top_k, conservative, sampling, prompt_ids, time.time() + timeout,
                     self._cache_on(recipe.name))

    def _cache_on(self, recipe_name: str) -> bool:
        return self._cache is not None and self._cache_recipes.get(recipe_name, True)

    # ---- generation ----------------------------------------------------------------------

    async def _merged_step(self, plan: _Plan, prefix: list[int], seq_id: str, stats: FetchStats) -> MergedDistribution:
        assert self._fetcher is not None
        queries = {role: [SequenceQuery(token_ids=prefix, sequence_id=seq_id)] for role in plan.recipe.roles}
        results = await self._fetcher.fetch(queries, plan.top_k, plan.deadline, plan.use_cache, stats)
        per_role = {role: results[role][0].positions[0] for role in plan.recipe.roles}
        return merge_position(plan.recipe, per_role, self.vocab_size, conservative_top_p=plan.conservative_top_p)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Validate, then stream one chunk per decoded token; the last chunk has finish + usage.

        Validation errors raise before the first chunk, so a transport can still set a status.
        """
        plan = self._plan(req)
        return self._decode(req, plan)

    async def _decode(self, req: GenerationRequest, plan: _Plan) -> AsyncIterator[GenerationChunk]:
        started = time.perf_counter()
        first_token_at: float | None = None
        stats = FetchStats()
        detok = IncrementalDetokenizer(self._tok, plan.prompt_ids)
        stops = StopStringMatcher(plan.sampling.stop)
        prefix = list(plan.prompt_ids)
        seq_id = req.request_id or secrets.token_hex(8)
        eos = self.eos_token_id
        finish: str | None = None
        generated = 0
        while finish is None:
            if len(prefix) >= self.max_context:
                finish = "context"
                break
            dist = await self._merged_step(plan, prefix, seq_id, stats)
            token = choose_token(dist, plan.sampling, position=len(prefix))
            generated += 1
            if first_token_at is None:
                first_token_at = time.perf_counter()
            out = TokenOutput(token_id=token, text="")
            if req.return_logprobs:
                out.logprob = dist.logprob_of(token)
            if req.return_model_logprobs:
                out.model_logprobs = {role: dist.model_logprob_of(role, token) for role in plan.recipe.roles}
            if token == eos and not plan.sampling.ignore_eos:
                finish = "eos"
                text = stops.feed(detok.flush()) + stops.flush()
                yield GenerationChunk(text=text, tokens=[out])
                break
            prefix.append(token)
            out.text = stops.feed(detok.push(token))
            if stops.stopped:
                finish = "stop"
            elif generated >= plan.sampling.max_new_tokens:
                finish = "length"
                out.text += stops.feed(detok.flush())
                out.text += stops.flush()
                if stops.stopped:
                    finish = "stop"
            yield GenerationChunk(text=out.text, tokens=[out])
        total = time.perf_counter() - started
        usage = Usage(
            prompt_tokens=len(plan.prompt_ids), completion_tokens=generated,
            time_to_first_token_ms=1000 * ((first_token_at or time.perf_counter()) - started),
            total_ms=1000 * total, tokens_per_s=generated / total if total > 0 else 0.0,
            seed=plan.sampling.seed, pool_calls=stats.pool_calls, cache_hits=stats.cache_hits,
            cache_misses=stats.cache_misses, cache_errors=stats.cache_errors,
            cache_bytes_read=stats.cache_bytes_read, cache_bytes_written=stats.cache_bytes_written,
            recipe=plan.recipe.name, logprob_top_k=plan.top_k,
        )
        # Only a context-length finish can still hold undecoded bytes or held-back stop-prefix text.
        tail = stops.feed(detok.flush()) + stops.flush() if finish == "context" else ""
        yield GenerationChunk(text=tail, finish_reason=finish, usage=usage)

    # ---- scoring -------------------------------------------------------------------------

    async def score(self, prompt: str, continuation: str, merge: MergeOptions, timeout_s: float | None = None) -> ScoreResult:
        if not self.infos:
            raise Unavailable("the coordinator has not finished starting; retry shortly")
        assert self._fetcher is not None
        recipe, top_k, conservative = self._resolve_merge(merge)
        prompt_ids = self._encode_prompt(prompt)
        cont_ids = self._encode_prompt(continuation, "continuation")
        ids = prompt_ids + cont_ids
        if len(ids) > self.max_context:
            raise InvalidArgument(
                f"prompt + continuation is {len(ids)} tokens; the models' context length is {self.max_context}"
            )
        candidates = sorted(set(cont_ids))
        # Position j scores cont_ids[j] given everything before it: the block ends one token early.
        query = SequenceQuery(token_ids=ids[:-1], num_positions=len(cont_ids), candidate_ids=candidates)
        deadline = time.time() + (timeout_s or self._cfg.default_timeout_s)
        results = await self._fetcher.fetch(
            {role: [query] for role in recipe.roles}, top_k, deadline, self._cache_on(recipe.name), FetchStats()
        )
        tokens: list[TokenOutput] = []
        total = 0.0
        for j, target in enumerate(cont_ids):
            per_role = {role: results[role][0].positions[j] for role in recipe.roles}
            dist = merge_position(recipe, per_role, self.vocab_size, candidates, conservative)
            lp = dist.logprob_of(target)
            total += lp
            tokens.append(TokenOutput(
                token_id=target, text=self._tok.decode([target]), logprob=lp,
                model_logprobs={role: dist.model_logprob_of(role, target) for role in recipe.roles},
            ))
        return ScoreResult(total_logprob=total, tokens=tokens, prompt_tokens=len(prompt_ids))

    # ---- discovery -----------------------------------------------------------------------

    def recipe_table(self) -> Mapping[str, RecipeConfig]:
        return self._recipes


def check_shared_vocabulary(infos: Mapping[str, ModelInfo]) -> None:
    """Raise FailedPrecondition naming the pools whose vocabularies differ."""
    items = list(infos.items())
    ref_name, ref = items[0]
    for name, info in items[1:]:
        if info.vocab_fingerprint != ref.vocab_fingerprint or info.vocab_size != ref.vocab_size:
            raise FailedPrecondition(
                f"pools do not share one vocabulary: {name!r} ({info.name}, {info.vocab_size} tokens, "
                f"fingerprint {info.vocab_fingerprint[:12]}) differs from {ref_name!r} ({ref.name}, "
                f"{ref.vocab_size} tokens, fingerprint {ref.vocab_fingerprint[:12]}); every model merged "
                f"token by token must use the same tokenizer"
            )
