"""What the coordinator believes each pool holds of a stream (what the next call may omit)."""

from __future__ import annotations

from eft_serve.coordinator.decode import SentPrefixes


def test_a_growing_prefix_omits_all_that_was_sent() -> None:
    sent = SentPrefixes()
    assert sent.known("p", [1, 2, 3]) == 0  # nothing sent yet
    sent.record("p", [1, 2, 3], committed=3)
    assert sent.known("p", [1, 2, 3, 4]) == 3
    assert sent.known("other", [1, 2, 3, 4]) == 0


def test_a_rejected_draft_tail_is_not_counted() -> None:
    sent = SentPrefixes()
    sent.record("p", [1, 2, 3, 10, 11, 12], committed=3)  # prefix [1, 2, 3] + a 3-token draft
    assert sent.known("p", [1, 2, 3, 10, 99]) == 4  # first drafted token kept, second rejected
    assert sent.known("p", [1, 2, 3, 10, 11, 12, 13]) == 6  # the whole block kept
    assert sent.known("p", [1, 2, 3, 5]) == 3  # nothing of the draft kept
