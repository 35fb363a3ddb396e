"""What every server we start as a child process shares (Redis, the nginx TLS front).

Owns the two safety nets: the child gets a death signal when its parent dies (so a SIGKILLed
`eft serve` or test run leaves no server behind), and every live server is stopped at interpreter
exit if a crashing caller forgot to. Does NOT know what the servers are or how they stop: each
registers an object with a `stop()` method.
"""

from __future__ import annotations

import atexit
import ctypes
import signal
import threading
from collections.abc import Callable
from typing import Protocol


class Stoppable(Protocol):
    def stop(self) -> None: ...


# Strong refs: a dropped, unstopped server must still be stopped.
_LIVE: set[Stoppable] = set()


def stop_at_exit(server: Stoppable) -> None:
    """Stop `server` at interpreter exit unless `forget_at_exit` was called first."""
    _LIVE.add(server)


def forget_at_exit(server: Stoppable) -> None:
    _LIVE.discard(server)


def _stop_all_at_exit() -> None:
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - at exit, stop every server we can; one failure must not skip the rest
            pass


atexit.register(_stop_all_at_exit)


def die_with_parent() -> None:
    """`preexec_fn` for `subprocess.Popen`: SIGTERM the child when its parent dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort: not Linux/glibc means no death signal, not no server
        pass


def death_signal_preexec() -> Callable[[], None] | None:
    """The `preexec_fn` to start a server with: `die_with_parent`, but only from the main thread —
    PDEATHSIG fires when the forking *thread* exits, so a server started from a worker thread
    would otherwise die with that thread."""
    return die_with_parent if threading.current_thread() is threading.main_thread() else None
