"""The decode loop: fetch → merge → choose → detokenise → stop, streamed token by token.

Owns turning a validated `GenerationPlan` into chunks. Each turn of the loop produces one or
more tokens with the merged distribution each was chosen from — one token per turn when decoding
plainly, or a verified speculative block (the drafter proposes k tokens, every pool of the recipe
scores all k + 1 positions in one call, `core.speculative` keeps what the merged model agrees
with plus its own next token). Every token then goes through the same finish rules (EOS, stop
strings, length, context) in order, so a block ends a stream exactly where plain decoding would
and nothing past a stop is streamed. With `top_logprobs`, every emitted token (plain or from a
block) carries the n most likely tokens of the merged distribution it was chosen from. Knows
nothing of validation (the plan is already checked), transports or how pools are reached. A chat request's pools each see their own prompt
(`RolePrefixes`); the generated tokens, and so the merge, are shared.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eft_serve.coordinator.fetch import StepFetcher
from eft_serve.coordinator.request import (
    FetchStats,
    GenerationChunk,
    SpeculationStats,
    TokenOutput,
    TopLogprob,
    Usage,
)
from eft_serve.coordinator.speculation_policy import SpeculationPolicy
from eft_serve.coordinator.validate import GenerationPlan, MergePlan
from eft_serve.coordinator.workers import INLINE_STEPS, StepWorkers
from eft_serve.core.detokenizer import IncrementalDetokenizer
from eft_serve.core.merge import MergedDistribution, merge_position
from eft_serve.core.sampling import choose_token
from eft_serve.core.speculative import verify_block
from eft_serve.core.stops import StopStringMatcher
from eft_serve.engine.types import DraftQuery, SequenceQuery, SequenceResult


@dataclass(frozen=True)
class DecodeContext:
    """What every stream shares: how to reach the pools and the facts fixed at start-up."""

    fetcher: StepFetcher
    tokenizer: Any
    vocab_size: int
    max_context: int
    # Each role's stop ids (its EOS and its generation config's, `ModelInfo.stop_ids`): a stream
    # ends at any stop id of a model in its recipe (a chat fine-tune's end-of-turn token too).
    stop_ids: Mapping[str, frozenset[int]]
    # Where a step's merge and sampling run: off the loop when they touch a whole vocabulary.
    steps: StepWorkers = INLINE_STEPS

    def stop_ids_of(self, roles: Sequence[str]) -> frozenset[int]:
        """The ids that end a stream over `roles`: the union of their models' stop ids."""
        return frozenset().union(*(self.stop_ids.get(role, frozenset()) for role in roles))

    def merge_entries(self, merge: MergePlan, positions: int) -> int:
        """How many (token, position) entries merging `positions` positions touches."""
        support = self.vocab_size if merge.logprob_top_k == 0 else merge.logprob_top_k * len(merge.recipe.roles)
        return min(support, self.vocab_size) * positions


async def merged_block(
    ctx: DecodeContext,
    merge: MergePlan,
    token_ids: list[int],
    num_positions: int,
    sequence_id: str,
    deadline: float,
    use_cache: bool,
    stats: FetchStats,
    prescored: Mapping[str, SequenceResult] | None = None,
    sent: SentPrefixes | None = None,
    prefixes: RolePrefixes | None = None,
) -> list[MergedDistribution]:
    """The recipe's merged distributions at the last `num_positions` positions of `token_ids`.
    Position j is the distribution of the token following ``token_ids[: len - num_positions + 1 + j]``.
    Every pool is called once, except the roles already answered in `prescored` (the drafter's
    own scores of its draft). With `sent`, each pool is sent only the tokens it has not seen yet
    in this stream (it rebuilds the rest, or the fetcher resends the whole prefix). With
    `prefixes` (a chat prompt), each pool is asked about its own prompt + the generated tokens."""
    roles = merge.recipe.roles
    known = dict(prescored or {})
    own = {role: prefixes.of(role, token_ids) if prefixes else token_ids for role in roles if role not in known}
    asked = {
        role: [
            SequenceQuery(
                token_ids=ids,
                num_positions=num_positions,
                sequence_id=sequence_id,
                known_prefix_length=sent.known(role, ids) if sent else 0,
            )
        ]
        for role, ids in own.items()
    }
    fetched = await ctx.fetcher.fetch(asked, merge.logprob_top_k, deadline, use_cache, stats) if asked else {}
    if sent:
        for role, ids in own.items():
            sent.record(role, ids, len(ids) - num_positions + 1)
    results = {**{role: r[0] for role, r in fetched.items()}, **known}

    def merge_all() -> list[MergedDistribution]:
        return [
            merge_position(
                merge.recipe,
                {role: results[role].positions[j] for role in roles},
                ctx.vocab_size,
                conservative_top_p=merge.conservative_top_p,
            )
            for j in range(num_positions)
        ]

    return await ctx.steps.run(ctx.merge_entries(merge, num_positions), merge_all)


class RolePrefixes:
    """Each pool's token ids in a chat stream: its own prompt, then the same generated tokens.

    The stream's token ids are the base's prompt + the generated tokens (positions, context
    checks and detokenising count those); a role whose prompt differs gets its prompt instead.
    """

    def __init__(self, base_prompt_length: int, prompts: Mapping[str, list[int]]) -> None:
        self._base = base_prompt_length
        self._prompts = prompts
        # Tokens the longest prompt adds beyond the base's: every prefix grows by the same tokens.
        self.extra = max([0, *(len(p) - base_prompt_length for p in prompts.values())])

    @classmethod
    def of_plan(cls, plan: GenerationPlan) -> RolePrefixes | None:
        return cls(len(plan.prompt_ids), plan.role_prompt_ids) if plan.role_prompt_ids else None

    def of(self, role: str, token_ids: list[int]) -> list[int]:
        prompt = self._prompts.get(role)
        return token_ids if prompt is None else prompt + token_ids[self._base :]


class SentPrefixes:
    """What each pool was last sent in this stream, so the next call can omit what it holds.

    The tokens before a call's first scored position are the stream's committed prefix, which
    only ever grows; only the drafted tokens after it can be rolled back (a partly rejected
    block). So a pool holds every committed token it was sent, and only the short uncommitted
    tail of the last send needs comparing: O(block) per call, not O(prefix) — this runs for
    every pool on every decoding step.
    """

    def __init__(self) -> None:
        self._sent: dict[str, tuple[int, list[int]]] = {}  # role -> (committed length, tokens after it)

    def known(self, role: str, token_ids: list[int]) -> int:
        last = self._sent.get(role)
        if last is None:
            return 0
        committed, tail = last
        known = min(committed, len(token_ids))
        for token in tail:
            if known >= len(token_ids) or token_ids[known] != token:
                break
            known += 1
        return known

    def record(self, role: str, token_ids: list[int], committed: int) -> None:
        self._sent[role] = (committed, token_ids[committed:])


async def _next_tokens(
    ctx: DecodeContext,
    plan: GenerationPlan,
    prefix: list[int],
    tokens_left: int,
    policy: SpeculationPolicy | None,
    fetch_stats: FetchStats,
    spec_stats: SpeculationStats,
    use_cache: bool,
    sent: SentPrefixes,
) -> list[tuple[int, MergedDistribution]]:
    """The next token(s) with the merged distribution each was chosen from."""
    spec = plan.speculation
    prefixes = RolePrefixes.of_plan(plan)
    extra = prefixes.extra if prefixes else 0
    # Never draft past the token budget or the context (of the longest per-role prefix): the
    # block's last position is the merged model's own token. The policy may ask for a plain step.
    k = min(policy.next_draft_size(), tokens_left - 1, ctx.max_context - extra - len(prefix) - 1) if policy else 0
    started = time.perf_counter()
    if spec is None or policy is None or k <= 0:
        (dist,) = await merged_block(
            ctx,
            plan.merge,
            prefix,
            1,
            plan.sequence_id,
            plan.deadline,
            use_cache,
            fetch_stats,
            sent=sent,
            prefixes=prefixes,
        )
        seconds = time.perf_counter() - started
        # Greedy is one argmax; sampling sorts the support (milliseconds at 150k tokens): off the loop.
        size = 0 if plan.sampling.greedy else len(dist.support)
        token = await ctx.steps.run(size, choose_token, dist, plan.sampling, len(prefix))
        if policy is not None and spec is not None:
            policy.record_plain(seconds, _drafter_agreed(dist, spec.drafter, token))
        return [(token, dist)]
    # A drafter that is also a model of the recipe scores its own draft in the same call.
    self_scored = spec.drafter in plan.merge.recipe.roles
    drafted = await ctx.fetcher.draft(
        spec.drafter,
        DraftQuery(
            token_ids=prefixes.of(spec.drafter, prefix) if prefixes else prefix,
            num_tokens=k,
            sequence_id=plan.sequence_id,
        ),
        plan.deadline,
        fetch_stats,
        score_logprob_top_k=plan.merge.logprob_top_k if self_scored else None,
    )
    draft = drafted.token_ids[:k]
    drafted_at = time.perf_counter()
    prescored: dict[str, SequenceResult] = {}
    if drafted.scores is not None and len(drafted.scores.positions) == len(drafted.token_ids) + 1:
        prescored[spec.drafter] = SequenceResult(drafted.scores.positions[: len(draft) + 1])
    dists = await merged_block(
        ctx,
        plan.merge,
        prefix + draft,
        len(draft) + 1,
        plan.sequence_id,
        plan.deadline,
        use_cache,
        fetch_stats,
        prescored,
        sent,
        prefixes,
    )
    size = sum(len(d.support) for d in dists)
    verdict = await ctx.steps.run(size, verify_block, dists, draft, plan.sampling, len(prefix), spec.acceptance)
    spec_stats.speculative_blocks += 1
    spec_stats.drafted_tokens += len(draft)
    spec_stats.accepted_tokens += verdict.accepted
    policy.record_block(len(draft), verdict.accepted, drafted_at - started, time.perf_counter() - drafted_at)
    spec_stats.fallbacks = policy.fallbacks
    return list(zip(verdict.tokens, dists))


def _drafter_agreed(dist: MergedDistribution, drafter: str, token: int) -> bool | None:
    """Whether the drafter's greedy choice at this position is `token` (None: it was not asked).

    A drafter of the recipe scored this position anyway, so plain steps tell the speculation
    policy how well it would have drafted, at no cost (its top token is in the merged support).
    """
    own = dist.model_logprobs.get(drafter)
    if own is None or not len(own):
        return None
    return int(dist.support[int(np.argmax(own))]) == token


def _model_tops(
    ctx: DecodeContext, plan: GenerationPlan, dist: MergedDistribution, roles: Sequence[str]
) -> dict[str, list[TopLogprob]]:
    """Each model's own `top_logprobs` most likely tokens at this position, from what its pool sent.

    In top-k mode at most `logprob_top_k` of them: past a model's top-k the merge holds only tail
    estimates, which are not that model's numbers.
    """
    n = plan.top_logprobs if plan.merge.logprob_top_k == 0 else min(plan.top_logprobs, plan.merge.logprob_top_k)
    return {role: _alternatives(ctx, dist.model_top(role, n)) for role in roles}


def _alternatives(ctx: DecodeContext, ranked: list[tuple[int, float]]) -> list[TopLogprob]:
    """(token id, logprob) pairs as `TopLogprob`s, each token decoded on its own."""
    return [TopLogprob(token_id=t, text=ctx.tokenizer.decode([t]), logprob=lp) for t, lp in ranked]


async def decode(ctx: DecodeContext, plan: GenerationPlan, use_cache: bool) -> AsyncIterator[GenerationChunk]:
    """Stream one chunk per decoded token; the last chunk carries the finish reason and usage."""
    started = time.perf_counter()
    first_token_at: float | None = None
    fetch_stats = FetchStats()
    spec_stats = SpeculationStats()
    policy = SpeculationPolicy(plan.speculation) if plan.speculation else None
    sent = SentPrefixes()
    detok = IncrementalDetokenizer(ctx.tokenizer, plan.prompt_ids)
    stops = StopStringMatcher(plan.sampling.stop)
    prefix = list(plan.prompt_ids)  # the base's prompt + generated tokens (see RolePrefixes)
    prefixes = RolePrefixes.of_plan(plan)
    extra = prefixes.extra if prefixes else 0
    roles = plan.merge.recipe.roles
    stop_ids = frozenset() if plan.sampling.ignore_eos else ctx.stop_ids_of(roles)
    finish: str | None = None
    generated = 0
    while finish is None:
        if len(prefix) + extra >= ctx.max_context:
            finish = "context"
            break
        chosen = await _next_tokens(
            ctx,
            plan,
            prefix,
            plan.sampling.max_new_tokens - generated,
            policy,
            fetch_stats,
            spec_stats,
            use_cache,
            sent,
        )
        for token, dist in chosen:
            generated += 1
            if first_token_at is None:
                first_token_at = time.perf_counter()
            out = TokenOutput(token_id=token, text="")
            if plan.return_logprobs:
                out.logprob = dist.logprob_of(token)
            if plan.top_logprobs:
                # From the merged support (in top-k mode: the union of the models' top-k, which
                # is what was sampled from). A speculative block's distributions are the same
                # per-position merges plain decoding computes, so the alternatives match too.
                out.top_logprobs = _alternatives(ctx, dist.top(plan.top_logprobs))
            if plan.return_model_logprobs:
                out.model_logprobs = {role: dist.model_logprob_of(role, token) for role in roles}
                if plan.top_logprobs:
                    out.model_top_logprobs = _model_tops(ctx, plan, dist, roles)
            if token in stop_ids:
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
            if finish is not None:
                break  # nothing past a stop, EOS or the token budget is streamed
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
        fetch=fetch_stats,
        speculation=spec_stats,
    )
    # Only a context-length finish can still hold undecoded bytes or held-back stop-prefix text.
    tail = stops.feed(detok.flush()) + stops.flush() if finish == "context" else ""
    yield GenerationChunk(text=tail, finish_reason=finish, usage=usage)
