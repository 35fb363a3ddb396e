"""Rendering rows (dicts) as CSV files, markdown tables and fixed-width console tables.

Owns number formatting and file writing only; which rows and columns exist is `report`'s.
CSV keeps floats to 6 decimals (NaN as an empty cell) so plots and checks can be redone from it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Column = tuple[str, str, str]  # (key, header, format spec: "" | ".3f" | "%" | ...)


def fmt(value: Any, spec: str = "") -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if spec == "%":
            return f"{100 * value:.1f}%"
        return format(value, spec or ".3f")
    return str(value)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else str(round(value, 6))
    return value


def write_csv(path: Path | str, rows: Sequence[Row], columns: Sequence[str] | None = None) -> Path:
    """Write `rows` (columns: `columns`, else the keys of the first row, in order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(columns or (rows[0].keys() if rows else []))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k, "")) for k in keys})
    return path


def read_csv(path: Path | str) -> list[dict[str, str]]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def markdown_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" if spec == "" and not _numeric(rows, k) else "---:" for k, _, spec in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k, ""), spec) for k, _, spec in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def console_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    cells = [[h for _, h, _ in columns]] + [[fmt(r.get(k, ""), spec) for k, _, spec in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    numeric = [_numeric(rows, k) for k, _, _ in columns]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(w) if num and n else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(rows: Sequence[Row], key: str) -> bool:
    vals = [r.get(key) for r in rows]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
