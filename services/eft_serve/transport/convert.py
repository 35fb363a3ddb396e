"""Conversions between engine/coordinator records and the `eft.v1` protobuf messages.

Owns field-by-field mapping only (protobuf, no gRPC), used by the gRPC servicers, the Serve
deployments and the result cache (which stores `SequenceResult` as protobuf bytes).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from eft_serve.coordinator.request import GenerationRequest, MergeOptions, ScoreResult, TokenOutput, Usage
from eft_serve.engine.types import DraftQuery, ModelInfo, PositionLogprobs, SequenceQuery, SequenceResult
from eft_serve.proto_gen.eft.v1 import eft_pb2, pool_pb2

FINISH_TO_PROTO = {
    None: eft_pb2.FINISH_REASON_UNSPECIFIED,
    "length": eft_pb2.FINISH_REASON_LENGTH,
    "stop": eft_pb2.FINISH_REASON_STOP,
    "eos": eft_pb2.FINISH_REASON_EOS,
    "context": eft_pb2.FINISH_REASON_CONTEXT,
}
FINISH_FROM_PROTO = {v: k for k, v in FINISH_TO_PROTO.items()}


# ---- pool messages -------------------------------------------------------------------------

def queries_to_proto(queries: Sequence[SequenceQuery], top_k: int, deadline: float | None) -> pool_pb2.NextTokenLogprobsRequest:
    return pool_pb2.NextTokenLogprobsRequest(
        sequences=[
            pool_pb2.SequenceQuery(
                sequence_id=q.sequence_id, token_ids=list(q.token_ids),
                num_positions=q.num_positions, candidate_ids=list(q.candidate_ids),
            )
            for q in queries
        ],
        top_k=top_k,
        deadline_unix_s=deadline or 0.0,
    )


def queries_from_proto(msg: pool_pb2.NextTokenLogprobsRequest) -> list[SequenceQuery]:
    return [
        SequenceQuery(
            token_ids=list(s.token_ids), num_positions=s.num_positions or 1,
            candidate_ids=list(s.candidate_ids), sequence_id=s.sequence_id,
        )
        for s in msg.sequences
    ]


def position_to_proto(p: PositionLogprobs) -> pool_pb2.PositionLogprobs:
    return pool_pb2.PositionLogprobs(
        top_ids=np.asarray(p.top_ids, dtype=np.int64).tolist(),
        top_logprobs=np.asarray(p.top_logprobs, dtype=np.float32).tolist(),
        candidate_logprobs=np.asarray(p.candidate_logprobs, dtype=np.float32).tolist(),
        tail_logmass=float(p.tail_logmass),
        full_logprobs=[] if p.full_logprobs is None else np.asarray(p.full_logprobs, dtype=np.float32).tolist(),
    )


def position_from_proto(m: pool_pb2.PositionLogprobs) -> PositionLogprobs:
    full = np.asarray(m.full_logprobs, dtype=np.float32) if len(m.full_logprobs) else None
    return PositionLogprobs(
        top_ids=np.asarray(m.top_ids, dtype=np.int64),
        top_logprobs=np.asarray(m.top_logprobs, dtype=np.float32),
        candidate_logprobs=np.asarray(m.candidate_logprobs, dtype=np.float32),
        tail_logmass=float(m.tail_logmass),
        full_logprobs=full,
    )


def result_to_proto(r: SequenceResult) -> pool_pb2.SequenceResult:
    return pool_pb2.SequenceResult(positions=[position_to_proto(p) for p in r.positions], cached_tokens=r.cached_tokens)


def result_from_proto(m: pool_pb2.SequenceResult) -> SequenceResult:
    return SequenceResult(positions=[position_from_proto(p) for p in m.positions], cached_tokens=m.cached_tokens)


def results_to_proto(results: Sequence[SequenceResult], fingerprint: str) -> pool_pb2.NextTokenLogprobsResponse:
    return pool_pb2.NextTokenLogprobsResponse(sequences=[result_to_proto(r) for r in results], model_fingerprint=fingerprint)


def results_from_proto(msg: pool_pb2.NextTokenLogprobsResponse) -> list[SequenceResult]:
    return [result_from_proto(s) for s in msg.sequences]


def drafts_from_proto(msg: pool_pb2.DraftRequest) -> list[DraftQuery]:
    return [DraftQuery(token_ids=list(s.token_ids), num_tokens=s.num_tokens, sequence_id=s.sequence_id) for s in msg.sequences]


def info_to_proto(info: ModelInfo, role: str) -> pool_pb2.ModelInfo:
    return pool_pb2.ModelInfo(
        name=info.name, role=role, vocab_size=info.vocab_size, max_context=info.max_context,
        eos_token_id=info.eos_token_id, vocab_fingerprint=info.vocab_fingerprint,
        model_fingerprint=info.model_fingerprint, dtype=info.dtype, device=info.device,
        num_parameters=info.num_parameters,
    )


def info_from_proto(m: pool_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name, vocab_size=m.vocab_size, max_context=m.max_context, eos_token_id=m.eos_token_id,
        vocab_fingerprint=m.vocab_fingerprint, model_fingerprint=m.model_fingerprint,
        dtype=m.dtype, device=m.device, num_parameters=m.num_parameters,
    )


# ---- client-facing messages ----------------------------------------------------------------

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
        timeout_s=m.timeout_s or None,
        request_id=m.request_id,
    )


def _finite(x: float | None) -> float:
    # proto floats carry -inf fine, but JSON printing of clients chokes on nan: keep it -inf.
    return float("-inf") if x is None or math.isnan(x) else float(x)


def token_to_proto(t: TokenOutput) -> eft_pb2.TokenInfo:
    return eft_pb2.TokenInfo(
        token_id=t.token_id, text=t.text,
        logprob=_finite(t.logprob) if t.logprob is not None else 0.0,
        model_logprobs={k: _finite(v) for k, v in t.model_logprobs.items()},
    )


def usage_to_proto(u: Usage) -> eft_pb2.Usage:
    return eft_pb2.Usage(**u.__dict__)


def score_to_proto(r: ScoreResult) -> eft_pb2.ScoreResponse:
    return eft_pb2.ScoreResponse(
        total_logprob=r.total_logprob, tokens=[token_to_proto(t) for t in r.tokens], prompt_tokens=r.prompt_tokens
    )
