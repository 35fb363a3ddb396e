"""The coordinator façade: start-up checks, then validate → decode for `Generate`, and `Score`.

Owns start-up (every pool's identity, the shared-vocabulary check, the tokenizer check), the
cached health verdict (`health`: the background pool probe, stopped by `stop`) and the
wiring of the pieces each request runs through: `validate` (request → plan), `decode` (the
token loop), `fetch` (one step's pool and cache traffic). Transport-neutral: pools arrive as
`PoolClient`s, the tokenizer as any HF tokenizer, the cache as a `NextTokenCache` or None.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from eft_serve.cache.next_token_cache import NextTokenCache
from eft_serve.config import CoordinatorConfig, RecipeConfig
from eft_serve.coordinator.decode import DecodeContext, decode
from eft_serve.coordinator.fetch import StepFetcher
from eft_serve.coordinator.health import HealthListener, HealthReport, PoolProber
from eft_serve.coordinator.pool_client import PoolClient
from eft_serve.coordinator.request import (
    FetchStats,
    GenerationChunk,
    GenerationRequest,
    MergeOptions,
    ScoreResult,
    TokenOutput,
)
from eft_serve.coordinator.retry_budget import RetryBudget
from eft_serve.coordinator.telemetry import NULL_TELEMETRY, Telemetry
from eft_serve.coordinator.validate import ModelLimits, RequestValidator
from eft_serve.coordinator.vocabulary import check_shared_vocabulary
from eft_serve.coordinator.workers import CHAT_RENDER_CHARS, StepWorkers, TokenizerWorkers
from eft_serve.core.merge import merge_position
from eft_serve.engine.stop_tokens import model_stop_token_ids
from eft_serve.engine.types import ModelInfo, SequenceQuery
from eft_serve.errors import FailedPrecondition, Unavailable


class EftCoordinator:
    def __init__(
        self,
        pools: Mapping[str, PoolClient],
        recipes: Mapping[str, RecipeConfig],
        tokenizer: Any,
        config: CoordinatorConfig,
        cache: NextTokenCache | None = None,
        telemetry: Telemetry = NULL_TELEMETRY,
        tokenizers: Mapping[str, Any] | None = None,
    ) -> None:
        # Each pool's own tokenizer, for chat prompts (same vocabulary, own chat template); pools
        # not named see chat prompts through `tokenizer`.
        self._tokenizers = dict(tokenizers or {})
        self._telemetry = telemetry  # pool-call observations (request ones come from the RPC bodies)
        self._pools = dict(pools)
        self._recipes = dict(recipes)
        self._tok = tokenizer
        self._cfg = config
        self.cache = cache
        self.infos: dict[str, ModelInfo] = {}
        self._validator: RequestValidator | None = None
        self._ctx: DecodeContext | None = None
        self._prober = PoolProber(self._pools, config.health_probe_period_s, config.health_probe_timeout_s)
        # Per-request CPU work leaves the event loop (coordinator.workers): tokenizing and chat
        # rendering, and the merge + sampling of full-vocabulary steps.
        self._tokenize = TokenizerWorkers(config.tokenizer_workers, config.tokenizer_backlog_chars)
        self._steps = StepWorkers(config.merge_workers)

    # ---- startup -------------------------------------------------------------------------

    async def start(self) -> None:
        """Ask every pool for its identity and refuse to serve if vocabularies differ."""
        names = list(self._pools)
        answers = await asyncio.gather(*(self._pools[n].info() for n in names), return_exceptions=True)
        infos: dict[str, ModelInfo] = {}
        for name, a in zip(names, answers):
            if isinstance(a, BaseException):
                raise Unavailable(f"model pool {name!r} did not answer its info call: {a}") from a
            infos[name] = a
        check_shared_vocabulary(infos, self._tokenizers)
        first = next(iter(infos.values()))
        tok_vocab = len(self._tok)
        if tok_vocab > first.vocab_size:
            raise FailedPrecondition(
                f"the coordinator's tokenizer has {tok_vocab} tokens but the models' tokenizer has "
                f"{first.vocab_size}; point the coordinator at the models' own tokenizer"
            )
        # Fixed once the pools are known; read by every request.
        limits = ModelLimits(vocab_size=first.vocab_size, max_context=min(i.max_context for i in infos.values()))
        fetcher = StepFetcher(
            self._pools,
            infos,
            self._cfg.pool_call_timeout_s,
            self.cache,
            retries=self._cfg.pool_call_retries,
            telemetry=self._telemetry,
            retry_budget=RetryBudget(self._cfg.pool_call_retry_budget),
        )
        self._validator = RequestValidator(self._recipes, self._cfg, self._tok, limits, self._tokenizers)
        self._ctx = DecodeContext(
            fetcher, self._tok, limits.vocab_size, limits.max_context, self._stop_ids(infos), self._steps
        )
        self.infos = infos
        await self._prober.start()  # every pool just answered: SERVING until a probe says otherwise

    async def stop(self) -> None:
        """Stop the background pool probe and the worker threads (idempotent)."""
        await self._prober.stop()
        self._close_workers()

    def stop_nowait(self) -> None:
        """Cancel the background pool probe without waiting (synchronous shutdown hooks)."""
        self._prober.stop_nowait()
        self._close_workers()

    def _close_workers(self) -> None:
        self._tokenize.close()
        self._steps.close()

    # ---- health --------------------------------------------------------------------------

    def health(self) -> HealthReport:
        """SERVING iff start-up finished and every pool answered its last probe; never calls a pool."""
        return self._prober.report()

    def add_health_listener(self, listener: HealthListener) -> None:
        """Awaited with the new report whenever health changes (SERVING <-> NOT_SERVING)."""
        self._prober.add_listener(listener)

    def _started(self) -> tuple[RequestValidator, DecodeContext]:
        if self._validator is None or self._ctx is None:
            raise Unavailable("the coordinator has not finished starting; retry shortly")
        return self._validator, self._ctx

    @property
    def vocab_size(self) -> int:
        return self._ctx.vocab_size if self._ctx else 0

    @property
    def max_context(self) -> int:
        return self._ctx.max_context if self._ctx else 0

    @property
    def default_recipe(self) -> str:
        return self._cfg.default_recipe

    @property
    def default_logprob_top_k(self) -> int:
        """What a request that does not set `logprob_top_k` gets (0 = exact)."""
        return self._cfg.default_logprob_top_k

    def _stop_ids(self, infos: Mapping[str, ModelInfo]) -> dict[str, frozenset[int]]:
        """Each role's stop ids: its pool's (tokenizer EOS + generation config) and the EOS of the
        role's own tokenizer here (a LoRA role's, which its host pool does not know)."""
        return {
            role: info.stop_ids() | frozenset(model_stop_token_ids(self._tokenizers.get(role), None))
            for role, info in infos.items()
        }

    def stop_token_ids(self, recipe: str | None = None) -> frozenset[int]:
        """The ids that end a stream of `recipe` (default: the default recipe) unless ignore_eos."""
        ctx = self._started()[1]
        return ctx.stop_ids_of(self._recipes[recipe or self._cfg.default_recipe].roles())

    def _cache_on(self, recipe_name: str) -> bool:
        return self.cache is not None and self.cache.enabled_for(recipe_name)

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Validate, then stream one chunk per decoded token; the last chunk has finish + usage.

        Validation errors raise before the first chunk, so a transport can still set a status.
        """
        validator, ctx = self._started()
        # Tokenizing a long prompt or rendering a chat runs on a worker thread; its errors still
        # raise here, before the stream exists.
        plan = await self._tokenize.run(_text_chars(req), validator.generation, req)
        return decode(ctx, plan, self._cache_on(plan.merge.recipe.name))

    # ---- scoring -------------------------------------------------------------------------

    async def score(
        self, prompt: str, continuation: str, merge: MergeOptions, timeout_s: float | None = None
    ) -> ScoreResult:
        validator, ctx = self._started()
        plan = await self._tokenize.run(
            len(prompt) + len(continuation), validator.score, prompt, continuation, merge, timeout_s
        )
        recipe = plan.merge.recipe
        cont_ids = plan.continuation_ids
        # Position j scores cont_ids[j] given everything before it: the block ends one token early.
        # Each position asks only for its own target (linear in the continuation, not quadratic).
        ids = plan.prompt_ids + cont_ids
        query = SequenceQuery(
            token_ids=ids[:-1], num_positions=len(cont_ids), position_candidate_ids=[[t] for t in cont_ids]
        )
        results = await ctx.fetcher.fetch(
            {role: [query] for role in recipe.roles},
            plan.merge.logprob_top_k,
            plan.deadline,
            self._cache_on(recipe.name),
            FetchStats(),
        )

        def merge_all() -> list[tuple[float, TokenOutput]]:
            # Up to max_score_continuation_tokens merges (full-vocabulary ones in exact mode) and
            # detokenisations: run in a worker thread so the event loop keeps streaming meanwhile.
            out = []
            for j, target in enumerate(cont_ids):
                per_role = {role: results[role][0].positions[j] for role in recipe.roles}
                dist = merge_position(recipe, per_role, ctx.vocab_size, [target], plan.merge.conservative_top_p)
                lp = dist.logprob_of(target)
                model_lps = {r: dist.model_logprob_of(r, target) for r in recipe.roles}
                out.append((lp, TokenOutput(target, self._tok.decode([target]), lp, model_lps)))
            return out

        merged = await asyncio.to_thread(merge_all)
        tokens = [token for _, token in merged]
        return ScoreResult(total_logprob=sum(lp for lp, _ in merged), tokens=tokens, prompt_tokens=len(plan.prompt_ids))

    # ---- discovery -----------------------------------------------------------------------

    def recipe_table(self) -> Mapping[str, RecipeConfig]:
        return self._recipes


def _text_chars(req: GenerationRequest) -> int:
    """What validating `req` tokenizes, in characters (a chat also pays a render per model)."""
    if not req.messages:
        return len(req.prompt)
    return len(req.prompt) + CHAT_RENDER_CHARS + sum(len(m.content) + 16 for m in req.messages)
