"""Plain data types of the engine boundary: what a pool is asked and what it answers.

Owns the in-process shape of a pool call (mirrors `eft.v1.NextTokenRequest`, without protobuf)
and the model identity record. Knows nothing about transports, merging or sampling.

Position semantics: a query with ``num_positions = m`` over ``token_ids`` of length ``n`` asks for
``m`` distributions; result ``j`` (0-based) is the distribution of the token that follows
``token_ids[: n - m + 1 + j]``. So ``m = 1`` is the usual "next token after the whole prefix", and
``m > 1`` scores a trailing block (speculative decoding, `Score`) in one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SequenceQuery:
    """One sequence in a batched pool call. Stateless: carries the whole prefix."""

    token_ids: Sequence[int]
    num_positions: int = 1
    # Exact logprobs of these ids are returned at every position (in this order).
    candidate_ids: Sequence[int] = ()
    # Per-position candidates instead: when non-empty, one list per position (num_positions of
    # them) and position j's candidate logprobs are those of position_candidate_ids[j]; then
    # candidate_ids must be empty. `Score` asks each position only for its own target token.
    position_candidate_ids: Sequence[Sequence[int]] = ()
    # Routing/KV-cache affinity hint only; results never depend on it.
    sequence_id: str = ""
    # Transport hint: the receiving pool may already hold token_ids[:known_prefix_length] under
    # sequence_id, so a wire may send only the rest (it falls back to all of it if the pool does
    # not). token_ids is always the whole prefix here; results never depend on the hint.
    known_prefix_length: int = 0
    # The LoRA adapter that answers (a co-located role, `engine.lora`); "" = the pool's own model.
    adapter: str = ""


def kv_sequence_id(sequence_id: str, adapter: str) -> str:
    """The id a sequence's KV (and incremental prefix) is kept under in a pool: the same token
    prefix under another adapter is another sequence (other weights, other KV)."""
    return f"{sequence_id}@{adapter}" if sequence_id and adapter else sequence_id


@dataclass
class PositionLogprobs:
    """The next-token distribution at one position, possibly truncated to top-k."""

    # Top-k ids sorted by descending logprob; empty when the full vocabulary is returned.
    top_ids: np.ndarray  # int64 [k]
    top_logprobs: np.ndarray  # float32 [k]
    # Aligned with the query's candidate_ids.
    candidate_logprobs: np.ndarray  # float32 [c]
    # log(probability mass outside top_ids); -inf when nothing is left out.
    tail_logmass: float
    # Full-vocabulary logprobs when the call asked for logprob_top_k = 0, else None.
    full_logprobs: np.ndarray | None = None


@dataclass
class SequenceResult:
    positions: list[PositionLogprobs]
    # How many prefix tokens were served from the replica's KV cache (observability only).
    cached_tokens: int = 0
    # The weights that answered (`ModelInfo.model_fingerprint`), as the pool wire reports it;
    # "" when unknown (in-process, or read from the cache, whose key names the weights).
    model_fingerprint: str = ""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab_size: int
    max_context: int
    eos_token_id: int
    # sha256 over the vocabulary (token -> id); pools that merge must share it.
    vocab_fingerprint: str
    # sha256 over config + weights: cache keys never mix different weights.
    model_fingerprint: str
    dtype: str = "float32"
    device: str = "cpu"
    num_parameters: int = 0
    extra: dict[str, str] = field(default_factory=dict)
    # LoRA adapters served inside this pool (co-located roles): name -> weights fingerprint.
    adapters: dict[str, str] = field(default_factory=dict)
    # Every id that ends this model's generation (`engine.stop_tokens`): its tokenizer's EOS and
    # its generation config's (a chat fine-tune's end-of-turn token). Empty: just eos_token_id.
    stop_token_ids: tuple[int, ...] = ()

    def stop_ids(self) -> frozenset[int]:
        """The ids that end a generation of this model (`stop_token_ids`, else the EOS if any)."""
        ids = self.stop_token_ids or (self.eos_token_id,)
        return frozenset(i for i in ids if i >= 0)


@dataclass(frozen=True)
class DraftQuery:
    """Ask a model to extend a prefix greedily by ``num_tokens`` (speculative-decoding drafts)."""

    token_ids: Sequence[int]
    num_tokens: int
    sequence_id: str = ""
    adapter: str = ""  # as in SequenceQuery


@dataclass
class DraftedSequence:
    """A draft, optionally with the drafter's own scores of it (one call instead of two)."""

    token_ids: list[int]
    # The drafter's next-token results at the len(token_ids) + 1 positions after the prefix
    # (position j follows prefix + token_ids[:j]); None unless asked for.
    scores: SequenceResult | None = None


@dataclass(frozen=True)
class Admission:
    """The answer of ``LogprobEngine.admit``: whether everything fits now, and the figures for a message."""

    ok: bool
    blocked: int = 0  # sequences that do not fit now
    need_bytes: int = 0  # what the blocked ones need
    running: int = 0  # running sequences
    running_bytes: int = 0  # their reservations
    max_bytes: int = 0


FITS = Admission(ok=True)


class LogprobEngine(Protocol):
    """What every engine (real or fake) offers. Synchronous; callers run it off their event loop.

    The first three are what an engine is; the rest are optional capabilities that the runner
    and the turn queue (`engine.runner`, `engine.turn_queue`) adapt to. `EngineBase` gives each
    its "not offered" default, so an engine declares only what it does differently.
    """

    # The engine batches concurrent calls itself (vLLM's continuous batching): the runner runs
    # them side by side instead of one turn at a time through its `TurnQueue`.
    schedules_concurrent_calls: bool

    @property
    def info(self) -> ModelInfo: ...

    def next_token_logprobs(self, queries: Sequence[SequenceQuery], logprob_top_k: int) -> list[SequenceResult]: ...

    def draft(self, queries: Sequence[DraftQuery]) -> list[list[int]]: ...

    def admit(self, demands: Sequence[tuple[str, int]]) -> Admission:
        """Whether every ``(kv sequence id, positions)`` fits the engine's KV budget now without
        evicting a running sequence (the fitting ones are then held for the call). Never waits:
        the runner polls until room frees or the call's time is up."""
        ...

    def uncached_tokens(self, query: SequenceQuery) -> int | None:
        """Positions a call for ``query`` would feed now (its prefix not yet in the sequence's KV);
        None when the engine keeps no KV for it. The turn queue chunks long prefills by it."""
        ...


class EngineBase:
    """The defaults of `LogprobEngine`'s optional capabilities, for engines to inherit: no KV
    budget of its own (everything fits), no per-sequence KV to chunk prefills by, and one call at
    a time (the runner's turn queue batches them)."""

    schedules_concurrent_calls: bool = False

    def admit(self, demands: Sequence[tuple[str, int]]) -> Admission:
        return FITS

    def uncached_tokens(self, query: SequenceQuery) -> int | None:
        return None
