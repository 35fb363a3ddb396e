"""Cache values: one model's `SequenceResult` <-> the bytes stored under its key.

Owns the value encoding (the `eft.v1.SequenceResult` protobuf) and its validation on the way
back: a value that does not parse, or parses to an empty result, raises `CorruptValue` so the
caller can count it as a miss and overwrite it. Knows nothing of keys, backends or Redis.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from eft_serve.engine.types import SequenceResult
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
