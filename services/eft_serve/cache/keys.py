"""Cache key construction for next-token results.

Owns: turning (model fingerprint, token prefix, request shape) into a stable string key.
Does NOT know: how a fingerprint is computed, or what a request shape means beyond the
string the caller hands in (``candidates_shape`` is a helper for the common shape).

Keys look like ``<prefix><fingerprint>:<blake2b-128 of tokens>:<blake2b-48 of shape>``.
Token ids are packed as a little-endian int32 array so keys are identical across hosts.
"""

from __future__ import annotations

import array
import hashlib
import sys
from collections.abc import Sequence

# Every key starts with this unless configured otherwise; bump the version when values change shape.
DEFAULT_KEY_PREFIX = "eft:v1:"
_TOKENS_DIGEST = 16  # 128 bits: collisions across realistic prefix counts are negligible
_SHAPE_DIGEST = 6  # shape strings are few; a short hash keeps keys compact


def _pack_int32_le(ids: Sequence[int]) -> bytes:
    arr = array.array("i", ids)  # raises OverflowError outside int32
    if arr.itemsize != 4:  # pragma: no cover - "i" is 4 bytes on all supported platforms
        raise RuntimeError("array('i') is not 32-bit on this platform")
    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()


def tokens_digest(token_ids: Sequence[int]) -> str:
    return hashlib.blake2b(_pack_int32_le(token_ids), digest_size=_TOKENS_DIGEST).hexdigest()


def next_token_key(prefix: str, model_fingerprint: str, token_ids: Sequence[int], request_shape: str) -> str:
    """Key of the next-token result of ``model_fingerprint`` after ``token_ids``.

    ``request_shape`` must capture everything besides the prefix that changes the stored
    value (top-k, candidate set, positions, ...): different shapes get different keys.
    """
    if not model_fingerprint:
        raise ValueError("model_fingerprint must be non-empty")
    shape = hashlib.blake2b(request_shape.encode(), digest_size=_SHAPE_DIGEST).hexdigest()
    return f"{prefix}{model_fingerprint}:{tokens_digest(token_ids)}:{shape}"


def candidates_shape(
    k: int,
    candidate_ids: Sequence[int] | None,
    positions: int,
    position_candidate_ids: Sequence[Sequence[int]] = (),
) -> str:
    """Canonical request-shape string, e.g. ``"k=20;pos=1;cand=none"``.

    Candidate order is kept (not sorted) because the stored value lists them in the
    caller's order. Per-position candidates add ``;pcand=<digest>`` over each list's length and
    ids, so lists that concatenate alike but split differently get different keys.
    """
    if candidate_ids is None:
        cand = "none"
    else:
        cand = hashlib.blake2b(_pack_int32_le(candidate_ids), digest_size=8).hexdigest()
    shape = f"k={k};pos={positions};cand={cand}"
    if position_candidate_ids:
        h = hashlib.blake2b(digest_size=8)
        for ids in position_candidate_ids:
            h.update(_pack_int32_le([len(ids)]))
            h.update(_pack_int32_le(ids))
        shape += f";pcand={h.hexdigest()}"
    return shape
