"""`eft demo` and `eft eval` fail start-up as `eft serve` does: one `error: ...` line naming what
cannot start and why, exit 2, no traceback, before the demo family is built (minutes). A Serve
start-up that times out is one line too, naming the applications still not running."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from ray.serve.schema import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    DeploymentStatusTrigger,
)

from eft_serve.preflight import StartupError
from eft_serve.serve.local import not_running_error


def _eft(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    eft = Path(sys.executable).parent / "eft"
    return subprocess.run(
        [str(eft), *args],
        capture_output=True,
        text=True,
        timeout=120,
        # A fresh HOME: no demo family cached there, so building one would show (and take minutes).
        env={"EFT_LOG_DIR": str(tmp_path / "logs"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )


def _errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stdout + proc.stderr
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_eft_demo_refuses_a_missing_model_in_one_line_before_building_the_family(tmp_path) -> None:
    proc = _eft(tmp_path, "demo", "--small-ft", str(tmp_path / "missing"))
    assert proc.returncode == 2, proc.stderr
    assert _errors(proc) == [f"error: pool 'small_ft': model directory {tmp_path / 'missing'} does not exist"]
    assert not (tmp_path / ".cache").exists()  # no demo family was built


def test_eft_eval_against_no_server_is_one_line_naming_the_address(tmp_path) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on (closed again at once)
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    proc = _eft(tmp_path, "eval", "--address", address, "--out", str(tmp_path / "results"))
    assert proc.returncode == 2, proc.stderr
    (line,) = _errors(proc)
    assert line.startswith(f"error: server {address}: UNAVAILABLE: "), line
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "results").exists()


def _deployment(status: DeploymentStatus, message: str) -> DeploymentStatusOverview:
    return DeploymentStatusOverview(
        status=status, status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_STARTED, replica_states={}, message=message
    )


def test_a_serve_start_up_timeout_is_one_line_naming_the_apps_not_running() -> None:
    statuses = {
        "pool-large_base": ApplicationStatusOverview(
            status=ApplicationStatus.RUNNING, message="", last_deployed_time_s=0.0, deployments={}
        ),
        "pool-small_ft": ApplicationStatusOverview(
            status=ApplicationStatus.DEPLOYING,
            message="",
            last_deployed_time_s=0.0,
            deployments={
                "ModelPool": _deployment(
                    DeploymentStatus.UPDATING,
                    "Deployment 'ModelPool' in application 'pool-small_ft' has 1 replicas that\n"
                    "have taken more than 30s to be scheduled.\n  Resources required: {'CPU': 1}",
                )
            },
        ),
    }
    err = not_running_error(["pool-small_ft", "pool-small_base"], statuses, 600.0)
    assert isinstance(err, StartupError)
    msg = str(err)
    assert "\n" not in msg and msg.startswith("applications still not running after 600s: ")
    assert "pool-small_ft (DEPLOYING; ModelPool UPDATING: Deployment 'ModelPool' in application" in msg
    assert "taken more than 30s to be scheduled. Resources required: {'CPU': 1}" in msg
    assert "pool-small_base (not deployed)" in msg and "pool-large_base" not in msg
    assert "coordinator.startup_timeout_s" in msg
