"""docs/api.md names every RPC, message and enum of the protos (protos/eft/v1/*.proto).

The protos are parsed here, so a new RPC or message fails this test until the API page says what
it is for.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "api.md"
PROTOS = sorted((ROOT / "protos" / "eft" / "v1").glob("*.proto"))
_DECL = re.compile(r"^\s*(?:rpc|message|enum|service)\s+(\w+)", re.M)


def _declared() -> set[str]:
    names: set[str] = set()
    for proto in PROTOS:
        text = re.sub(r"//[^\n]*", "", proto.read_text())
        names.update(_DECL.findall(text))
    return names


def test_protos_are_found_and_parsed() -> None:
    names = _declared()
    assert len(PROTOS) >= 2
    assert {"EftService", "ModelPool", "Generate", "NextTokenLogprobs", "GenerateRequest", "FinishReason"} <= names


def test_every_rpc_and_message_is_documented() -> None:
    page = PAGE.read_text()
    code = " ".join(re.findall(r"`([^`]+)`", page))  # names count in code spans only, not in prose
    missing = sorted(n for n in _declared() if not re.search(rf"\b{n}\b", code))
    assert not missing, f"docs/api.md does not mention (in backticks): {missing}"
