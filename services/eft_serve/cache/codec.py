"""Cache values: one model's `SequenceResult` <-> the bytes stored under its key.

Owns the value encoding (the `eft.v1.SequenceResult` protobuf) and its validation on the way
back: a value that does not parse, or parses to something that cannot be the answer to the
query it is stored under (wrong number of positions, mismatched lengths, ids outside the
vocabulary, a truncation that does not match, non-finite logprobs), raises `CorruptValue` so
the caller counts it as a miss and overwrites it — a bad value in Redis must never reach the
merge. With an HMAC key (`cache.hmac_key_env`), values are signed on write and verified on
read (`sign` / `verify`): the MAC covers the key the value is stored under as well as the value,
so neither a forged value nor a genuine one copied under another key is accepted (`BadMac`).
Knows nothing of how keys are built, backends or Redis.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import numpy as np

from eft_serve.engine.types import PositionLogprobs, SequenceResult

# protobuf and the generated stubs are imported where values are encoded or decoded, not at module
# load: the coordinator imports this module, and an in-process coordinator (tests/bench/gpu_bench.py
# on a machine with torch and transformers only) must import without protobuf.


class CorruptValue(ValueError):
    """A stored value that is not a usable `SequenceResult` (foreign, truncated or garbage)."""


class BadMac(CorruptValue):
    """A value whose HMAC does not verify (forged, tampered, unsigned, or moved from another key)."""


MAC_BYTES = 32  # HMAC-SHA256, stored in front of the value


def _mac(hmac_key: bytes, cache_key: str, payload: bytes) -> bytes:
    # The cache key is part of the message: a genuine value copied under another key fails.
    return hmac.new(hmac_key, cache_key.encode() + b"\x00" + payload, hashlib.sha256).digest()


def sign(hmac_key: bytes, cache_key: str, payload: bytes) -> bytes:
    """`payload` with its MAC in front, as stored under `cache_key`."""
    return _mac(hmac_key, cache_key, payload) + payload


def verify(hmac_key: bytes, cache_key: str, raw: bytes) -> bytes:
    """The payload of a signed value, or `BadMac` (constant-time comparison)."""
    if len(raw) < MAC_BYTES:
        raise BadMac("cached value is shorter than its MAC")
    mac, payload = raw[:MAC_BYTES], raw[MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(hmac_key, cache_key, payload)):
        raise BadMac("cached value's MAC does not verify")
    return payload


def encode_result(result: SequenceResult) -> bytes:
    from eft_serve.wire.pool_messages import result_to_proto

    return bytes(result_to_proto(result).SerializeToString())


def decode_result(raw: bytes) -> SequenceResult:
    from google.protobuf.message import DecodeError

    from eft_serve.proto_gen.eft.v1 import pool_pb2
    from eft_serve.wire.pool_messages import result_from_proto

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
    # With per-position candidates: how many each position has (then num_candidates is unused).
    position_candidates: tuple[int, ...] = ()


def decode_checked(raw: bytes, expected: ExpectedShape) -> SequenceResult:
    """`decode_result`, then `CorruptValue` unless the result fits `expected` exactly."""
    result = decode_result(raw)
    if len(result.positions) != expected.num_positions:
        raise CorruptValue(f"cached value has {len(result.positions)} positions, expected {expected.num_positions}")
    for j, p in enumerate(result.positions):
        wanted = expected.position_candidates[j] if expected.position_candidates else expected.num_candidates
        _check_position(p, expected, wanted)
    return result


def _check_position(p: PositionLogprobs, expected: ExpectedShape, num_candidates: int) -> None:
    top_ids, top_lp = np.asarray(p.top_ids), np.asarray(p.top_logprobs)
    if len(top_ids) != len(top_lp):
        raise CorruptValue("cached value: top_ids and top_logprobs differ in length")
    if len(p.candidate_logprobs) != num_candidates:
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
