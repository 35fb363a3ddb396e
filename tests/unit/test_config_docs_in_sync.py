"""`docs/configuration.md` is generated from the pydantic config tree and committed in sync with it.

Like the stubs' drift test (`test_generated_in_sync.py`): the `--check` command runs as a
subprocess, exactly as a developer would type it, and must pass on the committed page and fail,
naming the file and the fix, on a page that differs. The page also has to be complete: every key
of the tree appears with its default and a description.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from eft_serve import config_docs
from eft_serve.config import CoordinatorConfig, PoolConfig

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"
CHECK = [sys.executable, "-m", "eft_serve.config_docs", "--check"]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


def test_committed_page_matches_a_fresh_render() -> None:
    run = _run(CHECK)
    assert run.returncode == 0, f"docs/configuration.md drifted:\n{run.stdout}{run.stderr}"


def test_the_check_fails_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    edited = tmp_path / "configuration.md"
    edited.write_text(PAGE.read_text().replace("| `coordinator.default_recipe` |", "| `coordinator.default_recipes` |"))
    run = _run([*CHECK, "--out", str(edited)])
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"{edited}: differs from a fresh render" in run.stderr, run.stderr
    assert run.stderr.splitlines()[-1] == f"regenerate with: python -m eft_serve.config_docs --out {edited}"


def test_every_field_has_a_description() -> None:
    # A field without one renders blank: give it a docstring (the string right below the field)
    # or Field(description=...), then regenerate the page.
    assert config_docs.missing_descriptions() == []


def test_every_key_of_the_tree_is_on_the_page_with_its_own_default() -> None:
    text = config_docs.render()
    for name in PoolConfig.model_fields:
        assert f"| `pools.<role>.{name}` |" in text, name
    for name in CoordinatorConfig.model_fields:
        assert f"| `coordinator.{name}` |" in text, name
    for key in ("vllm.block_size", "replica.autoscaling.target_ongoing_requests", "replica.cpu_affinity"):
        assert f"| `pools.<role>.{key}` |" in text, key
    assert "| `recipes.<name>.prompt_format.<role>.template` |" in text
    assert "| `cache.hmac_key_env` |" in text and "| `local_redis.maxmemory_policy` |" in text
    # Defaults come from the parent's default instance, not the nested class: a pool replica
    # takes 64 calls at once by default, the coordinator runs on half a CPU.
    assert "| `pools.<role>.replica.max_ongoing_requests` | int | `64` |" in text
    assert "| `coordinator.replica.num_cpus` | float | `0.5` |" in text
    assert "| `coordinator.max_prompt_bytes` | int | `262144 (256 KiB)` | ≥ 1 |" in text
    assert '| `pools.<role>.engine` | "hf" \\| "vllm" | `"hf"` |' in text
    assert "| `pools` | map of str → object | `required` |" in text
