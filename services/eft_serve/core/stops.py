"""Stop strings over a text stream, without ever emitting text that a stop later cuts off.

Owns holding back the tail of the text that could still be the start of a stop string, and
cutting the output at the first stop. Knows nothing about tokens.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add decoded text; return what is safe to emit now. Sets `stopped` at a stop string."""
        if self.stopped or not text:
            return ""
        if not self._stops:
            return text
        buf = self._pending + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return buf[:cut]
        hold = self._held_suffix_len(buf)
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def _held_suffix_len(self, buf: str) -> int:
        # The longest suffix of buf that is a proper prefix of some stop string.
        for n in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def flush(self) -> str:
        """At the end of generation: held-back text that never became a stop string."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out
