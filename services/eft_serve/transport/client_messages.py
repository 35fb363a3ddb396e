"""Client messages: the coordinator's records (`coordinator.request`) <-> `eft.v1` client protobuf.

Owns the field-by-field mapping of the `EftService` messages (requests in, chunks/usage/scores
out). Protobuf only: knows nothing of gRPC servers or Ray; pool messages are `wire.pool_messages`.
"""

from __future__ import annotations

import dataclasses
import math

from eft_serve.coordinator.request import (
    ChatMessage,
    GenerationRequest,
    MergeOptions,
    ScoreResult,
    SpeculativeOptions,
    TokenOutput,
    TopLogprob,
    Usage,
)
from eft_serve.proto_gen.eft.v1 import eft_pb2

FINISH_TO_PROTO = {
    None: eft_pb2.FINISH_REASON_UNSPECIFIED,
    "length": eft_pb2.FINISH_REASON_LENGTH,
    "stop": eft_pb2.FINISH_REASON_STOP,
    "eos": eft_pb2.FINISH_REASON_EOS,
    "context": eft_pb2.FINISH_REASON_CONTEXT,
}
FINISH_FROM_PROTO = {v: k for k, v in FINISH_TO_PROTO.items()}


def merge_from_proto(m: eft_pb2.MergeParams) -> MergeOptions:
    return MergeOptions(
        recipe=m.recipe or None,
        beta=m.beta if m.HasField("beta") else None,
        expert_weights=dict(m.expert_weights),
        conservative=m.conservative,
        conservative_top_p=m.conservative_top_p if m.HasField("conservative_top_p") else None,
        logprob_top_k=m.logprob_top_k if m.HasField("logprob_top_k") else None,
    )


def generation_request_from_proto(m: eft_pb2.GenerateRequest) -> GenerationRequest:
    s = m.sampling
    return GenerationRequest(
        prompt=m.prompt,
        merge=merge_from_proto(m.merge),
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        max_new_tokens=s.max_new_tokens if s.HasField("max_new_tokens") else None,
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
        return_logprobs=m.return_logprobs,
        return_model_logprobs=m.return_model_logprobs,
        top_logprobs=m.top_logprobs,  # int32 on the wire: a negative count reaches validation, which refuses it
        timeout_s=m.timeout_s or None,
        request_id=m.request_id,
        speculative=speculative_from_proto(m.speculative),
        messages=tuple(ChatMessage(role=c.role, content=c.content) for c in m.messages),
    )


def speculative_from_proto(m: eft_pb2.SpeculativeParams) -> SpeculativeOptions:
    return SpeculativeOptions(
        enabled=m.enabled if m.HasField("enabled") else None,
        max_draft_tokens=m.max_draft_tokens if m.HasField("max_draft_tokens") else None,
        adaptive=m.adaptive if m.HasField("adaptive") else None,
    )


def _finite(x: float | None) -> float:
    # proto floats carry -inf fine, but JSON printing of clients chokes on nan: keep it -inf.
    return float("-inf") if x is None or math.isnan(x) else float(x)


def token_to_proto(t: TokenOutput) -> eft_pb2.TokenInfo:
    return eft_pb2.TokenInfo(
        token_id=t.token_id,
        text=t.text,
        logprob=_finite(t.logprob) if t.logprob is not None else 0.0,
        model_logprobs={k: _finite(v) for k, v in t.model_logprobs.items()},
        top_logprobs=[_top_to_proto(a) for a in t.top_logprobs],
        model_top_logprobs={
            role: eft_pb2.ModelTopLogprobs(alternatives=[_top_to_proto(a) for a in alts])
            for role, alts in t.model_top_logprobs.items()
        },
    )


def _top_to_proto(a: TopLogprob) -> eft_pb2.TopLogprob:
    return eft_pb2.TopLogprob(token_id=a.token_id, text=a.text, logprob=_finite(a.logprob))


def usage_to_proto(u: Usage) -> eft_pb2.Usage:
    # The wire keeps the fetch and speculation counters flat (pool_calls, drafted_tokens, ...).
    nested = ("fetch", "speculation")
    flat = {f.name: getattr(u, f.name) for f in dataclasses.fields(u) if f.name not in nested}
    spec = u.speculation
    return eft_pb2.Usage(
        **flat,
        **dataclasses.asdict(u.fetch),
        # `fallbacks` stays in-process (usage objects, tests); the wire has no field for it yet.
        **{k: v for k, v in dataclasses.asdict(spec).items() if k != "fallbacks"},
        mean_accepted_length=spec.mean_accepted_length,
    )


def score_to_proto(r: ScoreResult) -> eft_pb2.ScoreResponse:
    return eft_pb2.ScoreResponse(
        total_logprob=r.total_logprob, tokens=[token_to_proto(t) for t in r.tokens], prompt_tokens=r.prompt_tokens
    )
