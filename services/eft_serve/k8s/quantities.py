"""Kubernetes and Redis quantity strings: parsing them into numbers and writing MiB back.

Owns: `parse_cpu` ('1500m' -> 1.5), `parse_bytes` ('4Gi'), `parse_redis_bytes` (Redis' own
units: '256mb', '1g') and `to_mi`. Does NOT know: settings, pods or any manifest.
"""

from __future__ import annotations

import math
import re

_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_BYTES = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_BYTE_UNITS: dict[str | None, int] = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_REDIS_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 2**10,
    "m": 10**6,
    "mb": 2**20,
    "g": 10**9,
    "gb": 2**30,
}


def parse_cpu(q: str) -> float:
    m = _CPU.match(str(q))
    if not m:
        raise ValueError(f"not a CPU quantity: {q!r}")
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def parse_bytes(q: str) -> int:
    m = _BYTES.match(str(q))
    if not m:
        raise ValueError(f"not a memory quantity: {q!r}")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2)])


def parse_redis_bytes(q: str) -> int:
    """Redis' own memory units (`256mb`, `1gb`, `100m` = 10^8): not Kubernetes'."""
    m = re.match(r"^(\d+)\s*([a-zA-Z]*)$", str(q).strip())
    if not m or m.group(2).lower() not in _REDIS_UNITS:
        raise ValueError(f"not a Redis memory size: {q!r}")
    return int(m.group(1)) * _REDIS_UNITS[m.group(2).lower()]


def to_mi(n_bytes: float) -> str:
    """A memory quantity in whole MiB, rounded up."""
    return f"{math.ceil(n_bytes / 2**20)}Mi"
