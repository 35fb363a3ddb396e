"""Shared by the Kubernetes render and validation tests: the rendered documents of a target, one
object of a kind, and offline validation problems as one text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eft_serve.k8s.validate import load_target, validate_documents

ROOT = Path(__file__).resolve().parents[1]


def load_docs(target: str) -> list[dict[str, Any]]:
    return load_target(ROOT / "k8s" / target)


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def problems(docs: list[dict[str, Any]], kuberay_dir: Path) -> str:
    return "\n".join(validate_documents(docs, kuberay_dir))
