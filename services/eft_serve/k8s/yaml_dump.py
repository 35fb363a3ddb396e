"""YAML text of manifests: plain documents KubeRay and kubectl accept.

Owns: the dumper (no anchors or aliases, multi-line strings as `|` blocks, keys in insertion
order, no line wrapping), `dump_yaml` for one document and `dump_documents` for a `---` stream.
Does NOT know: what the documents are, nor which file they go to (`files`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml


class _Dumper(yaml.SafeDumper):
    """No anchors (KubeRay and kubectl want plain documents); multi-line strings as `|` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=10_000)


def dump_documents(docs: Sequence[dict[str, Any]]) -> str:
    return "---\n".join(dump_yaml(d) for d in docs)
