"""Quiet by default (`eft_serve.console`): library warnings and logs go to the log file, not the
terminal; with verbose they reach stderr too. Run in a fresh interpreter, as the `eft` command is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, sys, warnings
from eft_serve.console import setup_output
path = setup_output("probe", verbose=sys.argv[1] == "1")
warnings.warn("probe-python-warning", UserWarning)
warnings.warn("probe-deprecation", DeprecationWarning)
logging.getLogger("ray").info("probe-ray-info")
logging.getLogger("ray.serve").info("probe-serve-info")
from transformers.utils import logging as hf_logging
hf_logging.get_logger("transformers.modeling_utils").warning("probe-transformers-warning")
import ray._private.worker as w
w.print_to_stdstream({"lines": ["probe-raylet-message"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
print(path)
"""
PROBES = [
    "probe-python-warning",
    "probe-deprecation",
    "probe-ray-info",
    "probe-serve-info",
    "probe-transformers-warning",
]


def _run(tmp_path: Path, verbose: bool) -> tuple[subprocess.CompletedProcess[str], str]:
    env = {**os.environ, "EFT_LOG_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, "1" if verbose else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    path = Path(run.stdout.strip().splitlines()[-1])
    assert path.parent == tmp_path and path.name.startswith("eft-probe-")
    return run, path.read_text()


def test_library_output_goes_to_the_log_file_only(tmp_path) -> None:
    run, logged = _run(tmp_path, verbose=False)
    terminal = run.stdout + run.stderr
    for probe in [*PROBES, "probe-raylet-message"]:
        assert probe in logged, probe
        assert probe not in terminal, probe


def test_verbose_shows_it_on_stderr_too(tmp_path) -> None:
    run, logged = _run(tmp_path, verbose=True)
    for probe in PROBES:
        assert probe in logged and probe in run.stderr, probe
