"""No hand-written Python file under services/ or tests/ grows past 450 lines.

A file that long holds more than one thing; split it by what each part owns (generated protobuf
stubs under `proto_gen/` are exempt).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 450


def _hand_written() -> list[Path]:
    files = [p for top in ("services", "tests") for p in (ROOT / top).rglob("*.py")]
    return sorted(p for p in files if "proto_gen" not in p.parts and ".venv" not in p.parts)


def test_the_scan_finds_the_package_and_the_tests() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _hand_written()}
    assert {"services/eft_serve/cli.py", "tests/unit/test_file_sizes.py", "tests/bench/bench_engine.py"} <= names
    assert not any("proto_gen" in n for n in names)


def test_no_hand_written_python_file_exceeds_the_limit() -> None:
    too_long = {}
    for path in _hand_written():
        with path.open(encoding="utf-8") as f:
            lines = sum(1 for _ in f)
        if lines > LIMIT:
            too_long[path.relative_to(ROOT).as_posix()] = lines
    assert not too_long, f"over {LIMIT} lines, split by what each part owns: {too_long}"
