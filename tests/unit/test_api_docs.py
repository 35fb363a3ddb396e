"""docs/api.md names every RPC, message and enum of the protos (protos/eft/v1/*.proto), and every
field of every message where that message is described.

The protos are parsed here, so a new RPC, message or field fails this test until the API page says
what it is for.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "api.md"
PROTOS = sorted((ROOT / "protos" / "eft" / "v1").glob("*.proto"))
_DECL = re.compile(r"^\s*(?:rpc|message|enum|service)\s+(\w+)", re.M)
_MESSAGE = re.compile(r"^\s*message\s+(\w+)\s*\{", re.M)
_FIELD = re.compile(r"^\s*(?:optional\s+|repeated\s+)?(?:map<[^>]*>|[\w.]+)\s+(\w+)\s*=\s*\d+", re.M)


def _declared() -> set[str]:
    names: set[str] = set()
    for proto in PROTOS:
        text = re.sub(r"//[^\n]*", "", proto.read_text())
        names.update(_DECL.findall(text))
    return names


def _fields() -> dict[str, list[str]]:
    """Each message's field names (the protos declare no nested messages)."""
    out: dict[str, list[str]] = {}
    for proto in PROTOS:
        text = re.sub(r"//[^\n]*", "", proto.read_text())
        for m in _MESSAGE.finditer(text):
            body = text[m.end() : text.index("}", m.end())]
            out[m.group(1)] = _FIELD.findall(body)
    return out


def _blocks(page: str) -> list[set[str]]:
    """The words in code spans of each paragraph, list item (with its continuation lines) and table row."""
    blocks: list[set[str]] = []
    for paragraph in re.split(r"\n\s*\n", page):
        for part in re.split(r"\n(?=\* |\| )", paragraph):
            blocks.append({w for span in re.findall(r"`([^`]+)`", part) for w in re.findall(r"\w+", span)})
    return blocks


def test_protos_are_found_and_parsed() -> None:
    names = _declared()
    assert len(PROTOS) >= 2
    assert {"EftService", "ModelPool", "Generate", "NextTokenLogprobs", "GenerateRequest", "FinishReason"} <= names
    fields = _fields()
    assert "top_logprobs" in fields["TokenInfo"] and "expert_weights" in fields["MergeParams"]
    assert "ids" in fields["CandidateList"] and fields["ListModelsRequest"] == []


def test_every_rpc_and_message_is_documented() -> None:
    page = PAGE.read_text()
    code = " ".join(re.findall(r"`([^`]+)`", page))  # names count in code spans only, not in prose
    missing = sorted(n for n in _declared() if not re.search(rf"\b{n}\b", code))
    assert not missing, f"docs/api.md does not mention (in backticks): {missing}"


def test_every_field_is_documented_where_its_message_is() -> None:
    # A field counts when it is in a code span of a paragraph, list item or table row that also
    # names its message in a code span.
    blocks = _blocks(PAGE.read_text())
    missing = []
    for message, fields in sorted(_fields().items()):
        near = set().union(*(b for b in blocks if message in b))
        missing += [f"{message}.{f}" for f in fields if f not in near]
    assert not missing, f"docs/api.md does not name these fields (in backticks, beside their message): {missing}"
