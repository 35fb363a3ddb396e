"""Transport-neutral request/response records of the coordinator (what a `Generate` carries).

Owns the shapes only; `coordinator.validate` checks requests against the server's limits and
turns them into plans, `coordinator.decode` produces the chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from eft_serve.core.chat_format import CHAT_ROLES as CHAT_ROLES  # re-exported: the roles a message may have


@dataclass(frozen=True)
class MergeOptions:
    recipe: str | None = None
    beta: float | None = None
    expert_weights: Mapping[str, float] = field(default_factory=dict)
    conservative: bool = False
    conservative_top_p: float | None = None
    logprob_top_k: int | None = None  # None = server default; 0 = exact


@dataclass(frozen=True)
class SpeculativeOptions:
    """Per-request speculative decoding knobs; None = the server default."""

    enabled: bool | None = None
    max_draft_tokens: int | None = None
    adaptive: bool | None = None


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat prompt; `role` is one of `CHAT_ROLES` (checked by `coordinator.validate`)."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    merge: MergeOptions = field(default_factory=MergeOptions)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0  # sampling truncation of the merged distribution (0 = off); see MergeOptions.logprob_top_k
    seed: int | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    return_logprobs: bool = False
    return_model_logprobs: bool = False
    # The n most likely tokens of the merged distribution at each step (0 = none; > 0 implies
    # return_logprobs). At most `coordinator.max_top_logprobs`.
    top_logprobs: int = 0
    timeout_s: float | None = None
    request_id: str = ""
    speculative: SpeculativeOptions = field(default_factory=SpeculativeOptions)
    # A chat prompt: rendered per pool with that model's own format (the recipe's `prompt_format`).
    # When given, `prompt` must be "" (INVALID_ARGUMENT otherwise).
    messages: tuple[ChatMessage, ...] = ()


@dataclass(frozen=True)
class TopLogprob:
    """One alternative at a step: a token of the merged support, its text alone, its merged logprob."""

    token_id: int
    text: str
    logprob: float


@dataclass
class TokenOutput:
    token_id: int
    text: str
    logprob: float | None = None
    model_logprobs: dict[str, float] = field(default_factory=dict)
    # The most likely tokens of the merged distribution this token was chosen from, descending.
    top_logprobs: list[TopLogprob] = field(default_factory=list)
    # With return_model_logprobs and top_logprobs: each model's own most likely tokens at this
    # position, descending, each `logprob` that model's (not the merge's).
    model_top_logprobs: dict[str, list[TopLogprob]] = field(default_factory=dict)


@dataclass
class FetchStats:
    """Pool and cache traffic of one request, counted by `coordinator.fetch`."""

    pool_calls: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_errors: int = 0
    cache_bytes_read: int = 0
    cache_bytes_written: int = 0


@dataclass
class SpeculationStats:
    """Draft-and-verify blocks of one request (all zero when it decoded token by token)."""

    speculative_blocks: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    # Times the stream switched to plain decoding because blocks measured slower than plain steps.
    fallbacks: int = 0

    @property
    def mean_accepted_length(self) -> float:
        return self.accepted_tokens / self.speculative_blocks if self.speculative_blocks else 0.0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_s: float = 0.0
    seed: int = 0
    recipe: str = ""
    logprob_top_k: int = 0
    fetch: FetchStats = field(default_factory=FetchStats)
    speculation: SpeculationStats = field(default_factory=SpeculationStats)


@dataclass
class GenerationChunk:
    """One streamed message: new text, the tokens behind it, and at the end finish + usage."""

    text: str
    tokens: list[TokenOutput] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop" | "eos" | "context"
    usage: Usage | None = None


@dataclass
class ScoreResult:
    total_logprob: float
    tokens: list[TokenOutput]
    prompt_tokens: int
