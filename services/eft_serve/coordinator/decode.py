"""The decode loop: fetch → merge → sample → detokenise → stop, one token per step, streamed.

Owns turning a validated `GenerationPlan` into chunks: one step's merged distribution (the
step's pool traffic goes through `StepFetcher`), the token choice, EOS / stop strings / length /
context finishes, per-token logprobs, and the final usage. Knows nothing of validation (the plan
is already checked), transports or how pools are reached.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from eft_serve.coordinator.fetch import StepFetcher
from eft_serve.coordinator.request import FetchStats, GenerationChunk, TokenOutput, Usage
from eft_serve.coordinator.validate import GenerationPlan, MergePlan
from eft_serve.core.detokenizer import IncrementalDetokenizer
from eft_serve.core.merge import MergedDistribution, merge_position
from eft_serve.core.sampling import choose_token
from eft_serve.core.stops import StopStringMatcher
from eft_serve.engine.types import SequenceQuery


@dataclass(frozen=True)
class DecodeContext:
    """What every stream shares: how to reach the pools and the facts fixed at start-up."""

    fetcher: StepFetcher
    tokenizer: Any
    vocab_size: int
    max_context: int
    eos_token_id: int


async def merged_next_token(
    ctx: DecodeContext,
    merge: MergePlan,
    prefix: list[int],
    sequence_id: str,
    deadline: float,
    use_cache: bool,
    stats: FetchStats,
) -> MergedDistribution:
    """The recipe's merged distribution of the token after `prefix` (one step, every pool once)."""
    query = SequenceQuery(token_ids=prefix, sequence_id=sequence_id)
    results = await ctx.fetcher.fetch(
        {role: [query] for role in merge.recipe.roles}, merge.logprob_top_k, deadline, use_cache, stats
    )
    per_role = {role: results[role][0].positions[0] for role in merge.recipe.roles}
    return merge_position(merge.recipe, per_role, ctx.vocab_size, conservative_top_p=merge.conservative_top_p)


async def decode(ctx: DecodeContext, plan: GenerationPlan, use_cache: bool) -> AsyncIterator[GenerationChunk]:
    """Stream one chunk per decoded token; the last chunk carries the finish reason and usage."""
    started = time.perf_counter()
    first_token_at: float | None = None
    stats = FetchStats()
    detok = IncrementalDetokenizer(ctx.tokenizer, plan.prompt_ids)
    stops = StopStringMatcher(plan.sampling.stop)
    prefix = list(plan.prompt_ids)
    roles = plan.merge.recipe.roles
    finish: str | None = None
    generated = 0
    while finish is None:
        if len(prefix) >= ctx.max_context:
            finish = "context"
            break
        dist = await merged_next_token(ctx, plan.merge, prefix, plan.sequence_id, plan.deadline, use_cache, stats)
        token = choose_token(dist, plan.sampling, position=len(prefix))
        generated += 1
        if first_token_at is None:
            first_token_at = time.perf_counter()
        out = TokenOutput(token_id=token, text="")
        if plan.return_logprobs:
            out.logprob = dist.logprob_of(token)
        if plan.return_model_logprobs:
            out.model_logprobs = {role: dist.model_logprob_of(role, token) for role in roles}
        if token == ctx.eos_token_id and not plan.sampling.ignore_eos:
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
        prompt_tokens=len(plan.prompt_ids),
        completion_tokens=generated,
        time_to_first_token_ms=1000 * ((first_token_at or time.perf_counter()) - started),
        total_ms=1000 * total,
        tokens_per_s=generated / total if total > 0 else 0.0,
        seed=plan.sampling.seed,
        recipe=plan.merge.recipe.name,
        logprob_top_k=plan.merge.logprob_top_k,
        fetch=stats,
    )
    # Only a context-length finish can still hold undecoded bytes or held-back stop-prefix text.
    tail = stops.feed(detok.flush()) + stops.flush() if finish == "context" else ""
    yield GenerationChunk(text=tail, finish_reason=finish, usage=usage)
