"""Pool messages: engine records (`engine.types`) <-> `eft.v1` pool protobuf messages.

Owns the field-by-field mapping of the `ModelPool` service's messages, used by both pool
transports (plain gRPC, Ray Serve) and by the result cache's codec. Knows nothing of gRPC
channels, the coordinator's records or Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from eft_serve.engine.types import (
    DraftedSequence,
    DraftQuery,
    ModelInfo,
    PositionLogprobs,
    SequenceQuery,
    SequenceResult,
    kv_sequence_id,
)
from eft_serve.errors import PrefixUnknown
from eft_serve.proto_gen.eft.v1 import pool_pb2


def _omitted(q: SequenceQuery) -> int:
    # Only with a sequence id (the pool's memory is keyed by it), and at least one token is sent.
    if not q.sequence_id:
        return 0
    return max(0, min(q.known_prefix_length, len(q.token_ids) - 1))


def queries_to_proto(
    queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None
) -> pool_pb2.NextTokenLogprobsRequest:
    """Queries on the wire; a query's `known_prefix_length` head is omitted (incremental prefix)."""
    msg = pool_pb2.NextTokenLogprobsRequest(logprob_top_k=logprob_top_k, deadline_unix_s=deadline or 0.0)
    for q in queries:
        omitted = _omitted(q)
        msg.sequences.add(
            sequence_id=q.sequence_id,
            token_ids=list(q.token_ids[omitted:]),
            num_positions=q.num_positions,
            candidate_ids=list(q.candidate_ids),
            omitted_prefix_length=omitted,
            position_candidates=[pool_pb2.CandidateList(ids=list(c)) for c in q.position_candidate_ids],
            adapter=q.adapter,
        )
    return msg


RestorePrefix = Callable[[str, int, Sequence[int]], list[int]]


def queries_from_proto(
    msg: pool_pb2.NextTokenLogprobsRequest, restore: RestorePrefix | None = None
) -> list[SequenceQuery]:
    """Whole-prefix queries; an omitted head is rebuilt by `restore(key, omitted, tail)` (which
    raises `PrefixUnknown` when it cannot), `key` being the sequence's id under its adapter."""
    out = []
    for s in msg.sequences:
        tokens = list(s.token_ids)
        if s.omitted_prefix_length:
            if restore is None:
                raise PrefixUnknown("this pool keeps no sequence memory; resend the whole prefix")
            tokens = restore(kv_sequence_id(s.sequence_id, s.adapter), s.omitted_prefix_length, tokens)
        out.append(
            SequenceQuery(
                token_ids=tokens,
                num_positions=s.num_positions or 1,
                candidate_ids=list(s.candidate_ids),
                sequence_id=s.sequence_id,
                position_candidate_ids=[list(c.ids) for c in s.position_candidates],
                adapter=s.adapter,
            )
        )
    return out


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


def result_to_proto(r: SequenceResult, response_fingerprint: str | None = None) -> pool_pb2.SequenceResult:
    # In a response, a sequence names its weights only when they are not the response's (a
    # co-located adapter's); elsewhere (cache values, draft scores) it names none.
    named = response_fingerprint is not None and r.model_fingerprint != response_fingerprint
    own = r.model_fingerprint if named else ""
    return pool_pb2.SequenceResult(
        positions=[position_to_proto(p) for p in r.positions], cached_tokens=r.cached_tokens, model_fingerprint=own
    )


def result_from_proto(m: pool_pb2.SequenceResult) -> SequenceResult:
    return SequenceResult(
        positions=[position_from_proto(p) for p in m.positions],
        cached_tokens=m.cached_tokens,
        model_fingerprint=m.model_fingerprint,
    )


def results_to_proto(results: Sequence[SequenceResult], fingerprint: str) -> pool_pb2.NextTokenLogprobsResponse:
    return pool_pb2.NextTokenLogprobsResponse(
        sequences=[result_to_proto(r, fingerprint) for r in results], model_fingerprint=fingerprint
    )


def results_from_proto(msg: pool_pb2.NextTokenLogprobsResponse) -> list[SequenceResult]:
    """The answers, each naming the weights that produced them (`model_fingerprint`: its own when
    an adapter answered it, else the response's)."""
    out = [result_from_proto(s) for s in msg.sequences]
    for r in out:
        r.model_fingerprint = r.model_fingerprint or msg.model_fingerprint
    return out


def drafts_to_proto(
    queries: Sequence[DraftQuery], deadline: float | None, score_logprob_top_k: int | None = None
) -> pool_pb2.DraftRequest:
    msg = pool_pb2.DraftRequest(
        sequences=[
            pool_pb2.DraftQuery(
                sequence_id=q.sequence_id, token_ids=list(q.token_ids), num_tokens=q.num_tokens, adapter=q.adapter
            )
            for q in queries
        ],
        deadline_unix_s=deadline or 0.0,
    )
    if score_logprob_top_k is not None:
        msg.score_logprob_top_k = score_logprob_top_k
    return msg


def drafted_to_proto(drafts: Sequence[DraftedSequence]) -> pool_pb2.DraftResponse:
    out = pool_pb2.DraftResponse()
    for d in drafts:
        seq = out.sequences.add(token_ids=d.token_ids)
        if d.scores is not None:
            seq.scores.CopyFrom(result_to_proto(d.scores))
    return out


def drafted_from_proto(msg: pool_pb2.DraftResponse) -> list[DraftedSequence]:
    return [
        DraftedSequence(list(s.token_ids), result_from_proto(s.scores) if s.HasField("scores") else None)
        for s in msg.sequences
    ]


def drafts_from_proto(msg: pool_pb2.DraftRequest) -> list[DraftQuery]:
    return [
        DraftQuery(token_ids=list(s.token_ids), num_tokens=s.num_tokens, sequence_id=s.sequence_id, adapter=s.adapter)
        for s in msg.sequences
    ]


def info_to_proto(info: ModelInfo, role: str) -> pool_pb2.ModelInfo:
    return pool_pb2.ModelInfo(
        name=info.name,
        role=role,
        vocab_size=info.vocab_size,
        max_context=info.max_context,
        eos_token_id=info.eos_token_id,
        vocab_fingerprint=info.vocab_fingerprint,
        model_fingerprint=info.model_fingerprint,
        dtype=info.dtype,
        device=info.device,
        num_parameters=info.num_parameters,
        adapter_fingerprints=dict(info.adapters),
        head_rows=int(info.extra.get("head_rows", info.vocab_size)),
        stop_token_ids=list(info.stop_token_ids),
    )


def info_from_proto(m: pool_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        vocab_size=m.vocab_size,
        max_context=m.max_context,
        eos_token_id=m.eos_token_id,
        vocab_fingerprint=m.vocab_fingerprint,
        model_fingerprint=m.model_fingerprint,
        dtype=m.dtype,
        device=m.device,
        num_parameters=m.num_parameters,
        adapters=dict(m.adapter_fingerprints),
        extra={"head_rows": str(m.head_rows or m.vocab_size)},
        stop_token_ids=tuple(m.stop_token_ids),
    )
