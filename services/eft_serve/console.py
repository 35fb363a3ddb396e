"""What the long-running `eft` commands (serve, demo, eval, build-demo) show, and where the rest goes.

Owns quiet-by-default output: the commands print their own lines; library output — Python
warnings (transformers' notices, pydantic/deprecation warnings), the `transformers` and `torch`
loggers, Ray's and Serve's driver logs, our own `eft_serve` logger — goes to one log file per run
under `~/.cache/eft-serve/logs` (`$EFT_LOG_DIR` overrides); with `-v` it reaches stderr too.
Also owns `deferred_interrupts`: SIGINT ignored while a stack is tearing down, so a second Ctrl-C
cannot leave half of it running. Knows nothing of what the commands do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

# Loggers that libraries give their own stderr handlers (so records skip the root logger).
_LIBRARY_LOGGERS = ("ray", "ray.serve", "ray.data", "ray.tune", "ray.train", "transformers", "torch", "filelock")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_dir() -> Path:
    return Path(os.environ.get("EFT_LOG_DIR") or Path.home() / ".cache" / "eft-serve" / "logs")


def _quiet_environment() -> None:
    # Read by the libraries at import or by the processes Ray starts (inherited environment).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def route_library_logs() -> None:
    """Make every library logger hand its records to the root logger (and so to our handlers).

    Safe to call again after a library re-adds its handler (Ray does on `ray.init`)."""
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
    try:  # transformers keeps its own handler and level outside `logging` config
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def setup_output(command: str, verbose: bool = False) -> Path:
    """Send library output to a fresh log file (and to stderr with `verbose`); returns the file."""
    _quiet_environment()
    directory = log_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"eft-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(file_handler)
    if verbose:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(console)
    root.setLevel(logging.INFO)
    # warnings.warn(...) -> the "py.warnings" logger -> the file (shown once per place, as usual).
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    # Import what the commands import anyway, so their import-time handlers exist to be rerouted.
    import ray.serve  # noqa: F401

    route_library_logs()
    if not verbose:
        _route_ray_error_messages()
    return path


def _route_ray_error_messages() -> None:
    """Ray's driver prints error messages pushed by the cluster (e.g. "(raylet) Task
    ServeController.graceful_shutdown failed ..." while Serve shuts down) straight to stdout,
    whatever `log_to_driver` says; there is no option for it, so its one printing function is
    replaced by one that logs (to the file)."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:  # pragma: no cover - a Ray without that module prints as before
        return
    log = logging.getLogger("ray.driver_messages")

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            log.warning("(%s) %s", data.get("pid", "ray"), line)

    ray_worker.print_to_stdstream = to_log


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """SIGINT is ignored inside (teardown must not be cut short), restored after; a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
