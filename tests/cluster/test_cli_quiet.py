"""`eft serve` as a user runs it: quiet by default, and Ctrl-C stops it cleanly.

The command runs in its own session and Ctrl-C is sent to its whole process group, as a
terminal does (Ray's processes included). Its terminal output must be its own `[eft]` lines
only — no library WARNING/INFO lines, no "(raylet)" messages, no traceback — while the library
output it hid is in the log file it names; afterwards no process of its Ray instance is left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from eft_serve.config import demo_config
from eft_serve.infra.ports import free_port

pytestmark = pytest.mark.cluster

NOISE = re.compile(r"\b(WARNING|INFO|ERROR|DEBUG)\b|Traceback|\(raylet\)|graceful_shutdown|Warning:")


class Running:
    """`eft serve` in a new session; stdout/stderr collected by threads."""

    def __init__(self, tmp_path: Path) -> None:
        # Short: Ray's socket paths under temp_dir must stay below the OS limit (~107 bytes).
        self.ray_dir = tempfile.mkdtemp(prefix="eftq-", dir="/tmp")
        cfg = demo_config().model_dump(mode="json")
        cfg["ray"]["temp_dir"] = self.ray_dir
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        self.log_dir = tmp_path / "logs"
        env = {**os.environ, "EFT_LOG_DIR": str(self.log_dir), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
        argv = [sys.executable, "-m", "eft_serve.cli", "serve", "--insecure", "--no-cache", "--config", str(config)]
        argv += ["--grpc-port", str(free_port()), "--http-port", str(free_port())]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.out):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} (exit {self.proc.poll()}):\n" + "\n".join(self.out + self.err))
            time.sleep(0.2)

    def ctrl_c(self, timeout_s: float = 180) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)  # the whole foreground group, like a terminal
        rc = self.proc.wait(timeout=timeout_s)
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def leftover_processes(self) -> list[int]:
        """PIDs whose command line names this run's Ray temp dir (its raylet, GCS, workers)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if self.ray_dir.encode() in cmdline:
                    found.append(int(entry))
        return found

    def close(self) -> None:
        if self.proc.poll() is None:  # a failed test: stop what it started, by PID (its group)
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=120)
        shutil.rmtree(self.ray_dir, ignore_errors=True)


def _assert_quiet(run: Running) -> None:
    noisy = [line for line in run.out + run.err if NOISE.search(line)]
    assert not noisy, "library output on the terminal:\n" + "\n".join(noisy)
    own = [line for line in run.out if line.strip()]
    assert all(line.startswith("[eft]") for line in own), own
    (log_file,) = run.log_dir.glob("eft-serve-*.log")
    assert any(log_file.name in line for line in run.out)  # the command says where the rest went
    assert " INFO ray" in log_file.read_text()  # Ray's driver logs went there, not nowhere


def _assert_nothing_left(run: Running) -> None:
    deadline = time.monotonic() + 30
    while run.leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not run.leftover_processes()


@pytest.fixture
def serve(tmp_path):
    run = Running(tmp_path)
    try:
        yield run
    finally:
        run.close()


def test_serve_is_quiet_and_ctrl_c_stops_it_cleanly(serve) -> None:
    serve.wait_for("serving on", timeout_s=480)
    rc = serve.ctrl_c()
    assert rc == 0, "\n".join(serve.out + serve.err)
    assert serve.out[-1] == "[eft] stopping"
    _assert_quiet(serve)
    _assert_nothing_left(serve)


def test_ctrl_c_while_starting_stops_what_was_started(serve) -> None:
    serve.wait_for("deploying pool", timeout_s=300)
    rc = serve.ctrl_c()
    assert rc == 130, "\n".join(serve.out + serve.err)
    assert serve.err[-1] == "[eft] interrupted; everything it started is stopped"
    serve.err.pop()  # our own line on stderr; everything else is checked for noise
    _assert_quiet(serve)
    _assert_nothing_left(serve)
