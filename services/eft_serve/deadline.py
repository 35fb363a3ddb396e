"""Request deadlines: absolute unix times carried with every call, checked in one place.

Owns the rule "past the deadline, stop and say DEADLINE_EXCEEDED" and the arithmetic of what is
left of it. Knows nothing about who waits (the coordinator, a pool replica, its queue).
"""

from __future__ import annotations

import time

from eft_serve.errors import DeadlineExceeded


def seconds_left(deadline: float | None) -> float:
    """Seconds until `deadline` (unix time); +inf when there is none (None or 0)."""
    if not deadline:
        return float("inf")
    return deadline - time.time()


def raise_if_expired(deadline: float | None, where: str) -> None:
    """Raise DEADLINE_EXCEEDED naming `where` (e.g. "model pool 'large_base'") if it has passed."""
    if seconds_left(deadline) <= 0:
        raise DeadlineExceeded(f"{where}: the request's deadline passed before it was served")
