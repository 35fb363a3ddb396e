"""What a pool replica last saw of each sequence, so a caller may send only the new tokens.

Owns a bounded LRU map sequence id → token ids, and rebuilding a whole prefix from an omitted
head plus the tail that was sent. A sequence it does not hold (never seen, evicted, another
replica served it, or the head does not match in length) raises `PrefixUnknown`, and the
caller resends the whole prefix: correctness never depends on this memory, only the bytes on
the wire do. Knows nothing of transports, KV caches or models.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence

from eft_serve.errors import PrefixUnknown

# A few thousand live sequences per replica, a few MB of int32s: far below any KV cache.
DEFAULT_MAX_SEQUENCES = 4096
DEFAULT_MAX_TOKENS = 2_000_000


class SequenceMemory:
    def __init__(self, max_sequences: int = DEFAULT_MAX_SEQUENCES, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self._max_sequences = max_sequences
        self._max_tokens = max_tokens
        self._seen: OrderedDict[str, array[int]] = OrderedDict()
        self._tokens = 0
        self.restored = 0
        self.unknown = 0

    def __len__(self) -> int:
        return len(self._seen)

    def restore(self, sequence_id: str, omitted: int, tail: Sequence[int]) -> list[int]:
        """The whole prefix: the first `omitted` tokens last seen under `sequence_id` + `tail`."""
        seen = self._seen.get(sequence_id) if sequence_id else None
        if seen is None or len(seen) < omitted:
            self.unknown += 1
            raise PrefixUnknown(
                f"this pool replica does not hold the first {omitted} tokens of sequence {sequence_id!r}; "
                "resend the whole prefix"
            )
        self._seen.move_to_end(sequence_id)
        self.restored += 1
        return [*seen[:omitted], *tail]

    def remember(self, sequence_id: str, token_ids: Sequence[int], omitted: int = 0) -> None:
        """Record `token_ids` (the whole prefix) as what `sequence_id` holds now. With `omitted`,
        its first `omitted` tokens are the ones held already (it was `restore`d): only the tail
        is copied — the usual step costs O(new tokens), not O(prefix)."""
        if not sequence_id:
            return
        old = self._seen.pop(sequence_id, None)
        if old is not None:
            self._tokens -= len(old)
        if old is not None and 0 < omitted <= len(old):
            del old[omitted:]
            old.extend(token_ids[omitted:])
            seen = old
        else:
            seen = array("i", token_ids)
        self._seen[sequence_id] = seen
        self._tokens += len(seen)
        while self._seen and (len(self._seen) > self._max_sequences or self._tokens > self._max_tokens):
            _, evicted = self._seen.popitem(last=False)
            self._tokens -= len(evicted)

    def clear(self) -> None:
        self._seen.clear()
        self._tokens = 0
