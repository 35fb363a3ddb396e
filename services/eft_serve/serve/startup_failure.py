"""Why a Serve deployment failed, in one line: a marker replicas raise, found again by the driver.

Owns the marker format. A replica that cannot start (a pool's model, the coordinator's checks)
raises `marked(...)`; Serve then reports the whole replica traceback in the application's status
message, from which `cause_in(...)` recovers the one line the replica meant. Knows nothing of
which checks exist.
"""

from __future__ import annotations

import re

__all__ = ["ReplicaStartupError", "marked", "cause_in"]

_OPEN, _CLOSE = "<<eft-startup>>", "<</eft-startup>>"
_FOUND = re.compile(re.escape(_OPEN) + r"(.*?)" + re.escape(_CLOSE), re.DOTALL)


class ReplicaStartupError(RuntimeError):
    """A replica's start-up failure whose message carries the one-line cause between markers."""


def marked(who: str, exc: BaseException) -> ReplicaStartupError:
    """`who: cause` of `exc` (its own message, one line), wrapped so the driver can find it."""
    text = " ".join(str(getattr(exc, "message", None) or exc).split()) or type(exc).__name__
    return ReplicaStartupError(f"{_OPEN}{who}: {text}{_CLOSE}")


def cause_in(message: str | None) -> str | None:
    """The first marked cause in a Serve status message (None: the failure was not marked)."""
    found = _FOUND.search(message or "")
    return " ".join(found.group(1).split()) if found else None
