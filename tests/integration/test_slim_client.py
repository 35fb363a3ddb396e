"""The slim client distribution (clients/python) in a fresh venv, against a real plain-gRPC server.

The venv is built from PyPI in a tmp dir (`pip install` of a tmp copy of clients/python, pip's
cache in the same tmp dir): torch, transformers and Ray must not be importable there, only
`eft_serve_client`. The server is this process's loopback coordinator over fake-engine pools;
the venv's `eft-client generate` and a Python snippet stream from it. A last test imports both
stub sets (the service's and the slim client's) in one process, in both orders.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eft_serve.client import AsyncEftClient
from eft_serve.proto_gen.eft.v1 import eft_pb2
from eft_serve.testing.grpc_coordinator import start_coordinator_server
from eft_serve.transport.coordinator_rpc import CoordinatorRpc

from fakes import fake_coordinator

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "ray")


def _env(tmp: Path) -> dict[str, str]:
    """This process's environment minus anything that would let the venv see the main one."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    return {
        **env,
        "PYTHONNOUSERSITE": "1",
        "PIP_CACHE_DIR": str(tmp / "pip-cache"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "TMPDIR": str(tmp),
    }


def _run(argv: list[str | Path], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("slim")
    env = _env(tmp)
    # A copy, so that the build writes no build/ or *.egg-info into the checkout.
    src = tmp / "src"
    shutil.copytree(
        ROOT / "clients" / "python", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    )
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", venv], env, timeout=60)
    assert made.returncode == 0, made.stderr
    installed = _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", src], env, timeout=180)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv / "bin", env


def test_fresh_venv_has_the_client_and_none_of_the_stack(slim_venv) -> None:
    bin_dir, env = slim_venv
    probe = (
        "import importlib, json\n"
        "found = {}\n"
        f"for name in {(*HEAVY, 'eft_serve')!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        found[name] = True\n"
        "    except ImportError:\n"
        "        found[name] = False\n"
        "import eft_serve_client\n"
        "found['eft_serve_client'] = eft_serve_client.__file__\n"
        "print(json.dumps(found))\n"
    )
    run = _run([bin_dir / "python", "-c", probe], env)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert {name: found[name] for name in (*HEAVY, "eft_serve")} == dict.fromkeys((*HEAVY, "eft_serve"), False)
    assert Path(found["eft_serve_client"]).is_relative_to(bin_dir.parent)
    listed = _run([bin_dir / "python", "-m", "pip", "list", "--format=json"], env)
    assert listed.returncode == 0, listed.stderr
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"eft-serve-client", "grpcio", "protobuf"} <= names
    assert not names & {"torch", "transformers", "ray", "eft-serve"}, names


@pytest.fixture
async def server() -> AsyncIterator[str]:
    coord = fake_coordinator()
    await coord.start()
    grpc_server, port = await start_coordinator_server(CoordinatorRpc(coord))
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await grpc_server.stop(grace=None)


SNIPPET = """
import json, sys
from eft_serve_client import EftClient
with EftClient(sys.argv[1], timeout=30) as c:
    health = c.health()
    msgs = list(c.generate("hello", temperature=0, max_new_tokens=8, ignore_eos=True,
                           speculative=True, max_draft_tokens=4, adaptive_draft=False))
    last = msgs[-1]
    print(json.dumps({
        "health": health,
        "deltas": [m.text for m in msgs],
        "has_usage": last.HasField("usage"),
        "completion_tokens": last.usage.completion_tokens,
        "speculative_blocks": last.usage.speculative_blocks,
        "finish_reason": last.finish_reason,
    }))
"""


async def test_cli_and_client_stream_from_a_loopback_server(slim_venv, server: str) -> None:
    bin_dir, env = slim_venv
    # The expected text, from the service package's own client in this process.
    async with AsyncEftClient(server, timeout=20) as client:
        expected = (await client.complete("hello", temperature=0, max_new_tokens=8, ignore_eos=True)).text
    assert expected

    # The server runs on this event loop: the venv's processes run in threads meanwhile.
    cli = await asyncio.to_thread(
        _run,
        [bin_dir / "eft-client", "generate", "hello", "--address", server, "--temperature", "0"]
        + ["--max-new-tokens", "8", "--ignore-eos"],
        env,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == expected + "\n"
    assert "[8 tokens, " in cli.stderr and "recipe upscale" in cli.stderr, cli.stderr

    bad = await asyncio.to_thread(_run, [bin_dir / "eft-client", "generate", "", "--address", server], env)
    assert bad.returncode == 2 and "error: INVALID_ARGUMENT" in bad.stderr, bad.stderr

    snippet = await asyncio.to_thread(_run, [bin_dir / "python", "-c", SNIPPET, server], env)
    assert snippet.returncode == 0, snippet.stderr
    out = json.loads(snippet.stdout)
    assert out["health"] == 1  # SERVING
    assert len([d for d in out["deltas"] if d]) > 1 and "".join(out["deltas"]) == expected
    assert out["has_usage"] and out["completion_tokens"] == 8 and out["speculative_blocks"] > 0
    assert out["finish_reason"] == eft_pb2.FINISH_REASON_LENGTH


BOTH_STUBS = """
import sys
from google.protobuf import descriptor_pool
if sys.argv[1] == "client-first":
    from eft_serve_client.proto_gen.eft.v1 import eft_pb2 as slim
    from eft_serve.proto_gen.eft.v1 import eft_pb2 as svc
else:
    from eft_serve.proto_gen.eft.v1 import eft_pb2 as svc
    from eft_serve_client.proto_gen.eft.v1 import eft_pb2 as slim
import eft_serve.client, eft_serve_client
assert eft_serve.client.EftClient is eft_serve_client.EftClient
assert svc.DESCRIPTOR.pool is descriptor_pool.Default() and slim.DESCRIPTOR.pool is not descriptor_pool.Default()
assert slim.GenerateRequest is not svc.GenerateRequest
assert svc.GenerateRequest.__module__ == "eft_serve.proto_gen.eft.v1.eft_pb2"
assert slim.GenerateRequest.__module__ == "eft_serve_client.proto_gen.eft.v1.eft_pb2"
req = eft_serve.client.build_generate_request("x", temperature=0.5, speculative=True, max_draft_tokens=3)
back = svc.GenerateRequest.FromString(req.SerializeToString())
assert (back.prompt, back.sampling.temperature, back.speculative.max_draft_tokens) == ("x", 0.5, 3)
print("ok")
"""


@pytest.mark.parametrize("order", ["client-first", "service-first"])
def test_both_stub_sets_in_one_process(order: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", BOTH_STUBS, order], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
