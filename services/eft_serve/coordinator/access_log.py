"""The structured access log: one JSON line per finished request on the logger `eft_serve.access`.

Owns the line's fields (time, method, request id, key id, recipe, status, prompt/completion tokens,
TTFT, latency, speculative and cache counts) and the rule that prompt text is written only when
`coordinator.access_log.include_prompt` is on. A `Telemetry` observer: it sees `RequestRecord`s,
knows nothing of transports or metrics, and leaves where the lines go to logging's handlers
(`install_handler` adds a plain one to stderr for a replica, which lands in its Ray log file).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from eft_serve.coordinator.telemetry import NullTelemetry, RequestRecord

ACCESS_LOGGER = "eft_serve.access"
# Caller-chosen strings (a recipe name asked for, a request id) are cut to this in the log.
_MAX_FIELD_CHARS = 128


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_FIELD_CHARS else text[:_MAX_FIELD_CHARS] + "…"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 3)


def access_entry(record: RequestRecord, include_prompt: bool = False) -> dict[str, Any]:
    """The JSON object of one request's line."""
    spec = record.speculation
    entry: dict[str, Any] = {
        "ts": round(time.time(), 3),
        "method": record.method,
        "request_id": _clip(record.request_id),
        "key_id": record.key_id,
        "recipe": _clip(record.recipe),
        "status": record.status,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "ttft_ms": _ms(record.ttft_s),
        "latency_ms": _ms(record.latency_s),
        "speculative_blocks": spec.speculative_blocks,
        "drafted_tokens": spec.drafted_tokens,
        "accepted_tokens": spec.accepted_tokens,
        "cache_hits": record.cache_hits,
        "cache_misses": record.cache_misses,
    }
    if include_prompt:
        entry["prompt"] = record.prompt
    return entry


class AccessLog(NullTelemetry):
    """Writes one line per finished request; every other observation is ignored (inherited no-ops)."""

    def __init__(self, include_prompt: bool = False, logger: logging.Logger | None = None) -> None:
        self._include_prompt = include_prompt
        self._log = logger or logging.getLogger(ACCESS_LOGGER)

    def request_finished(self, record: RequestRecord) -> None:
        if self._log.isEnabledFor(logging.INFO):
            self._log.info(json.dumps(access_entry(record, self._include_prompt), ensure_ascii=False))


def install_handler(stream: Any = None) -> logging.Logger:
    """Send `eft_serve.access` lines, bare, to `stream` (stderr) at INFO, once per process."""
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "_eft_access", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._eft_access = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    # The lines are the whole message: not again through the root logger's format.
    logger.propagate = False
    return logger
