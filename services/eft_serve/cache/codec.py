"""Cache values: one model's `SequenceResult` <-> the bytes stored under its key.

Owns the value encoding (the `eft.v1.SequenceResult` protobuf) and its validation on the way
back: a value that does not parse, or parses to something that cannot be the answer to the
query it is stored under (wrong number of positions, mismatched lengths, ids outside the
vocabulary, a truncation that does not match, non-finite logprobs), raises `CorruptValue` so
the caller counts it as a miss and overwrites it — a bad value in Redis must never reach the
merge. Knows nothing of keys, backends or Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from eft_serve.engine.types import PositionLogprobs, SequenceResult
from eft_serve.proto_gen.eft.v1 import pool_pb2
from eft_serve.wire.pool_messages import result_from_proto, result_to_proto


class CorruptValue(ValueError):
    """A stored value that is not a usable `SequenceResult` (foreign, truncated or garbage)."""


def encode_result(result: SequenceResult) -> bytes:
    return bytes(result_to_proto(result).SerializeToString())


def decode_result(raw: bytes) -> SequenceResult:
    try:
        result = result_from_proto(pool_pb2.SequenceResult.FromString(raw))
    except (DecodeError, ValueError, TypeError) as e:
        raise CorruptValue(f"undecodable cached value: {e}") from None
    if not result.positions:
        raise CorruptValue("cached value has no positions")
    return result


@dataclass(frozen=True)
class ExpectedShape:
    """What a cached answer to one query must look like."""

    num_positions: int
    num_candidates: int
    logprob_top_k: int  # 0 = full vocabulary
    vocab_size: int


def decode_checked(raw: bytes, expected: ExpectedShape) -> SequenceResult:
    """`decode_result`, then `CorruptValue` unless the result fits `expected` exactly."""
    result = decode_result(raw)
    if len(result.positions) != expected.num_positions:
        raise CorruptValue(f"cached value has {len(result.positions)} positions, expected {expected.num_positions}")
    for p in result.positions:
        _check_position(p, expected)
    return result


def _check_position(p: PositionLogprobs, expected: ExpectedShape) -> None:
    top_ids, top_lp = np.asarray(p.top_ids), np.asarray(p.top_logprobs)
    if len(top_ids) != len(top_lp):
        raise CorruptValue("cached value: top_ids and top_logprobs differ in length")
    if len(p.candidate_logprobs) != expected.num_candidates:
        raise CorruptValue("cached value: candidate logprobs do not match the query's candidates")
    if expected.logprob_top_k == 0:
        if p.full_logprobs is None or len(p.full_logprobs) != expected.vocab_size:
            raise CorruptValue("cached value: exact mode needs full-vocabulary logprobs")
        if np.isnan(np.asarray(p.full_logprobs)).any():
            raise CorruptValue("cached value: NaN logprobs")
    elif len(top_ids) > min(expected.logprob_top_k, expected.vocab_size) or p.full_logprobs is not None:
        raise CorruptValue("cached value: not a top-k answer of this size")
    if len(top_ids) and (top_ids.min() < 0 or top_ids.max() >= expected.vocab_size):
        raise CorruptValue("cached value: token ids outside the vocabulary")
    if np.isnan(top_lp).any() or np.isnan(np.asarray(p.candidate_logprobs)).any():
        raise CorruptValue("cached value: NaN logprobs")
