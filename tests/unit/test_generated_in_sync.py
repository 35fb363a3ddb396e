"""Every generated artifact is committed in sync with its source: the one drift test.

All generators follow one `--check` convention: render in memory, compare with the committed
files, exit 1 naming each drifted file and the command that regenerates it, exit 0 when in sync.
Each check runs as a subprocess, exactly as a developer or CI would type it, and under a fixed
hash seed other than this process's, so set or dict order cannot leak into committed text.
The second test proves each check can fail: it points the check at a copy with one file edited.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
GEN_PROTOS = str(ROOT / "scripts" / "gen_protos.py")

CHECKS: dict[str, list[str]] = {
    "protos": [PY, GEN_PROTOS, "--check"],
    "serve-config": [
        PY,
        "-m",
        "eft_serve.cli",
        "render-serve-config",
        "--config",
        "deploy/demo.yaml",
        "--out",
        "deploy/serve_demo.yaml",
        "--check",
    ],
    "k8s": [PY, "-m", "eft_serve.k8s.render", "--all", "--check"],
}


def _run(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("artifact", list(CHECKS))
def test_committed_artifact_matches_a_fresh_render(artifact: str) -> None:
    run = _run(CHECKS[artifact])
    assert run.returncode == 0, f"{artifact} drifted:\n{run.stdout}{run.stderr}"


def _touch(path: Path) -> None:
    path.write_text(path.read_text() + "# edited by hand\n")


def _drifted_protos(tmp: Path) -> tuple[list[str], Path, Path]:
    out = tmp / "proto_gen"
    shutil.copytree(ROOT / "services" / "eft_serve" / "proto_gen", out, ignore=shutil.ignore_patterns("__pycache__"))
    edited = out / "eft" / "v1" / "eft_pb2.pyi"
    _touch(edited)
    return [PY, GEN_PROTOS, "--check", "--out", str(out)], tmp, edited


def _drifted_serve_config(tmp: Path) -> tuple[list[str], Path, Path]:
    edited = tmp / "serve_demo.yaml"
    shutil.copy(ROOT / "deploy" / "serve_demo.yaml", edited)
    _touch(edited)
    return (
        [
            PY,
            "-m",
            "eft_serve.cli",
            "render-serve-config",
            "--config",
            str(ROOT / "deploy" / "demo.yaml"),
            "--out",
            str(edited),
            "--check",
        ],
        tmp,
        edited,
    )


def _drifted_k8s(tmp: Path) -> tuple[list[str], Path, Path]:
    # A checkout of its own: the renderer finds it by walking up from the working directory.
    repo = tmp / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "pyproject.toml", repo)
    for d in ("k8s", "deploy"):
        shutil.copytree(ROOT / d, repo / d)
    edited = repo / "k8s" / "base" / "pdbs.yaml"
    _touch(edited)
    return [PY, "-m", "eft_serve.k8s.render", "--all", "--check"], repo / "k8s" / "overlays", edited


DRIFTED: dict[str, Callable[[Path], tuple[list[str], Path, Path]]] = {
    "protos": _drifted_protos,
    "serve-config": _drifted_serve_config,
    "k8s": _drifted_k8s,
}


@pytest.mark.parametrize("artifact", list(DRIFTED))
def test_the_check_fails_naming_the_file_and_the_fix(artifact: str, tmp_path: Path) -> None:
    argv, cwd, edited = DRIFTED[artifact](tmp_path)
    run = _run(argv, cwd=cwd)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"{edited.resolve()}: differs from a fresh" in run.stderr, run.stderr
    assert "regenerate with: " in run.stderr.splitlines()[-1], run.stderr
