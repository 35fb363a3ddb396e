"""The coordinator's configuration: request defaults and limits, pool calls, health, speculation.

Owns the schema of what one coordinator replica enforces and defaults per request. Knows nothing
of the API doors in front of it (`config.frontends`) or of the pools it calls.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from eft_serve.config.replica import ReplicaConfig, replica_with_defaults
from eft_serve.strict_model import StrictModel

# Replica options that differ from ReplicaConfig's own defaults here.
_REPLICA_DEFAULTS: dict[str, Any] = {"num_cpus": 0.5, "max_ongoing_requests": 64}


class SpeculativeConfig(StrictModel):
    """Speculative decoding (paper §4.3): a small model drafts a block, every pool scores it once."""

    enabled: bool = False
    """Server default for requests that do not say; a request may turn it on or off."""
    max_draft_tokens: int = Field(8, ge=1, le=64)
    """Most tokens drafted per block (a request may ask for fewer, never more)."""
    adaptive: bool = True
    """Grow the block after a fully accepted one, shrink it after an early rejection."""
    drafter: str = "expert"
    """Who drafts: "expert" = the recipe's first expert with a non-zero weight (the small
    fine-tuned model in up-scaling), or a pool role name."""
    acceptance: Literal["coupled", "rejection"] = "coupled"
    """"coupled": a drafted token is kept iff the token plain decoding would choose at that
    position (same seed) equals it, so output is identical to non-speculative decoding;
    "rejection": standard speculative rejection sampling (same distribution, not same text)."""


class AccessLogConfig(StrictModel):
    """One JSON line per request from the coordinator (logger `eft_serve.access`, docs/operations.md#logs)."""

    enabled: bool = True
    """Write one JSON line per request."""
    include_prompt: bool = False
    """Prompt text is user data: off unless an operator turns it on."""


class CoordinatorConfig(StrictModel):
    """The coordinator: request defaults and limits, pool calls, health probing."""

    default_recipe: str = "upscale"
    """Recipe of requests that name none."""
    default_logprob_top_k: int = Field(20, ge=0)
    """Per-model top-k used for merging when a request does not say; 0 = exact full vocabulary."""
    max_logprob_top_k: int = Field(1024, ge=1)
    """Largest per-model top-k a request may ask for."""
    max_top_logprobs: int = Field(20, ge=0)
    """Most alternatives a request may ask for per generated token (`top_logprobs`)."""
    default_max_new_tokens: int = Field(64, ge=1)
    """Tokens generated when a request does not say."""
    max_new_tokens_cap: int = Field(512, ge=1)
    """Most tokens a request may ask for (INVALID_ARGUMENT above)."""
    max_stop_strings: int = Field(16, ge=0)
    """Most stop strings per request."""
    max_stop_string_chars: int = Field(256, ge=1)
    """Longest stop string in characters (each is matched against the text of every new token)."""
    max_prompt_bytes: int = Field(256 * 1024, ge=1)
    """A prompt longer than this many UTF-8 bytes is refused before it is tokenized."""
    max_score_continuation_tokens: int = Field(512, ge=1)
    """Most tokens a Score continuation may have (each is one scored position in every pool)."""
    tokenizer_workers: int = Field(1, ge=0)
    """Threads that tokenize prompts and render chats off the event loop (anything over ~1 KiB of
    text), so a long prompt never stalls the replica's other streams (docs/latency-isolation.md).
    One serialises encodes on a tokenizer (as vLLM does); 0 = on the event loop (benchmarks only)."""
    tokenizer_backlog_chars: int = Field(2 * 1024 * 1024, ge=1)
    """Characters of prompt text a replica may have waiting for or in tokenization (about 8
    maximum-size prompts, ~1.5 s of one thread); a request beyond it is refused RESOURCE_EXHAUSTED."""
    merge_workers: int = Field(2, ge=0)
    """Threads that merge and sample full-vocabulary steps (exact mode over a real vocabulary:
    milliseconds a token) off the event loop; top-k steps stay on it. 0 = on the event loop."""
    allow_exact_mode: bool = True
    """Exact mode (logprob_top_k = 0: full-vocabulary logprobs from every pool) is costly; off
    refuses it with PERMISSION_DENIED for every caller (API keys can refuse it per key too)."""
    default_timeout_s: float = Field(120.0, gt=0)
    """Deadline of a request that sets no `timeout_s` (queue time included)."""
    max_timeout_s: float = Field(600.0, gt=0)
    """The largest timeout_s a request may ask for (INVALID_ARGUMENT above); the gRPC proxy's
    request timeout defaults to this plus a margin (`grpc.request_timeout_s`)."""
    pool_call_timeout_s: float = Field(30.0, gt=0)
    """One pool call slower than this is reported UNAVAILABLE instead of hanging the stream."""
    pool_call_retries: int = Field(2, ge=0)
    """The wire is stateless, so a failed pool call is retried (another replica may serve it)
    while the request's deadline allows; a lost replica costs a recompute, not a request."""
    pool_call_retry_budget: float = Field(0.1, ge=0, le=1)
    """Retries (connection-level failures only) may add at most this fraction of the pool calls
    made (plus a small reserve), so an outage is not multiplied into a retry storm."""
    coalesce_pool_calls: bool = True
    """Concurrent streams' pool calls of one event-loop turn leave as one call per pool replica
    (coordinator.call_coalescer): far fewer Serve calls at the same KV affinity."""
    conservative_top_p: float = Field(0.9, gt=0, le=1)
    """Conservative decoding: outside the expert's top-p set the expert/reference ratio is 1."""
    startup_timeout_s: float = Field(300.0, gt=0)
    """How long startup waits for the pools to answer Info (vocabulary check)."""
    health_probe_period_s: float = Field(2.0, gt=0)
    """Health: every period each pool's Info is probed (under the timeout); gRPC health checks
    answer SERVING only while every pool answered its last probe."""
    health_probe_timeout_s: float = Field(1.0, gt=0)
    """Budget of one pool's health probe."""
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    """Server defaults of speculative up-scaling."""
    access_log: AccessLogConfig = Field(default_factory=AccessLogConfig)
    """The per-request JSON access log."""
    replica: ReplicaConfig = Field(default_factory=lambda: ReplicaConfig(**_REPLICA_DEFAULTS))
    """Serve replica options of the coordinator."""

    @field_validator("replica", mode="before")
    @classmethod
    def _replica_keys_over_these_defaults(cls, value: Any) -> Any:
        return replica_with_defaults(value, _REPLICA_DEFAULTS)

    @model_validator(mode="after")
    def _timeouts(self) -> CoordinatorConfig:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError(
                f"coordinator.default_timeout_s ({self.default_timeout_s}) exceeds max_timeout_s ({self.max_timeout_s})"
            )
        return self
