"""The start-up rule that lets pools merge: they share one tokenizer.

Owns the check (pools agree when their vocabulary fingerprints agree, whatever their output heads'
row counts: padded rows are cut off by the engines) and a refusal a person can act on: which pools
differ, their tokenizer sizes, and the first ids whose tokens differ when the tokenizers are at hand.
Knows nothing of transports or how the tokenizers were loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eft_serve.engine.types import ModelInfo
from eft_serve.errors import FailedPrecondition

__all__ = ["check_shared_vocabulary", "first_token_differences"]

# How many differing ids a refusal names (enough to see the pattern, short enough for one line).
_SHOWN = 3


def _id_to_token(tokenizer: Any) -> dict[int, str]:
    return {int(i): t for t, i in tokenizer.get_vocab().items()}


def first_token_differences(a: Any, b: Any, limit: int = _SHOWN) -> list[tuple[int, str | None, str | None]]:
    """The first ``limit`` ids whose tokens differ between tokenizers ``a`` and ``b`` (None: no token)."""
    ta, tb = _id_to_token(a), _id_to_token(b)
    out: list[tuple[int, str | None, str | None]] = []
    for i in range(max(len(ta), len(tb), max(ta, default=-1) + 1, max(tb, default=-1) + 1)):
        if ta.get(i) != tb.get(i):
            out.append((i, ta.get(i), tb.get(i)))
            if len(out) >= limit:
                break
    return out


def _describe(name: str, info: ModelInfo) -> str:
    head = info.extra.get("head_rows")
    rows = f", output head {head} rows" if head and head != str(info.vocab_size) else ""
    return (
        f"{name!r} ({info.name}: tokenizer of {info.vocab_size} ids{rows}, fingerprint {info.vocab_fingerprint[:12]})"
    )


def check_shared_vocabulary(infos: Mapping[str, ModelInfo], tokenizers: Mapping[str, Any] | None = None) -> None:
    """Raise FailedPrecondition naming the pools whose tokenizers differ, and how they differ."""
    items = list(infos.items())
    ref_name, ref = items[0]
    for name, info in items[1:]:
        if info.vocab_fingerprint == ref.vocab_fingerprint and info.vocab_size == ref.vocab_size:
            continue
        how = ""
        toks = tokenizers or {}
        if ref_name in toks and name in toks:
            diffs = first_token_differences(toks[ref_name], toks[name])
            if diffs:
                shown = ", ".join(f"id {i}: {a!r} vs {b!r}" for i, a, b in diffs)
                how = f"; first differing ids: {shown}"
            else:
                # The fingerprint hashes only that map (special-token roles may differ): the pools
                # computed it differently, e.g. replicas of different eft-serve versions.
                how = "; their id-to-token maps agree here, so the pools hashed them differently (mixed versions?)"
        raise FailedPrecondition(
            f"pools do not share one tokenizer: {_describe(name, info)} differs from {_describe(ref_name, ref)}"
            f"{how}; every model merged token by token must use the same tokenizer"
        )
