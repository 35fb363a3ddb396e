"""A pool replica's memory of each sequence: rebuilds omitted heads, refuses what it lacks."""

from __future__ import annotations

import pytest

from eft_serve.engine.sequence_memory import SequenceMemory
from eft_serve.errors import PrefixUnknown


def test_restores_the_head_it_saw_plus_the_new_tail() -> None:
    mem = SequenceMemory()
    mem.remember("s", [1, 2, 3, 4])
    assert mem.restore("s", 4, [5]) == [1, 2, 3, 4, 5]
    # A partly rejected speculative block: only the shared head is omitted.
    assert mem.restore("s", 2, [9, 9]) == [1, 2, 9, 9]
    assert mem.restored == 2


@pytest.mark.parametrize("sequence_id, omitted", [("other", 1), ("s", 5), ("", 1)])
def test_unknown_or_too_short_is_prefix_unknown(sequence_id: str, omitted: int) -> None:
    mem = SequenceMemory()
    mem.remember("s", [1, 2, 3, 4])
    with pytest.raises(PrefixUnknown, match="resend the whole prefix"):
        mem.restore(sequence_id, omitted, [7])
    assert mem.unknown == 1


def test_bounded_by_sequences_and_tokens_least_recently_used_first() -> None:
    mem = SequenceMemory(max_sequences=2, max_tokens=10)
    mem.remember("a", [1] * 4)
    mem.remember("b", [2] * 4)
    mem.restore("a", 4, [])  # a is now the most recently used
    mem.remember("c", [3] * 4)  # over 2 sequences: b goes
    with pytest.raises(PrefixUnknown):
        mem.restore("b", 1, [])
    mem.remember("d", [4] * 8)  # over 10 tokens: a and c go
    assert len(mem) == 1 and mem.restore("d", 8, []) == [4] * 8


def test_no_sequence_id_is_not_remembered() -> None:
    mem = SequenceMemory()
    mem.remember("", [1, 2])
    assert len(mem) == 0


def test_remembering_a_restored_prefix_keeps_it_whole() -> None:
    mem = SequenceMemory()
    mem.remember("s", [1, 2, 3, 4])
    full = mem.restore("s", 2, [7, 8, 9])  # a rolled-back tail replaced by a longer one
    mem.remember("s", full, omitted=2)
    assert mem.restore("s", 5, []) == [1, 2, 7, 8, 9]
    with pytest.raises(PrefixUnknown):
        mem.restore("s", 6, [])
