"""On the session's Ray cluster: pools whose heads are padded differently serve together, and a
pool that cannot load fails its deployment with one line naming it (issue 18 items 1 and 4).

Extra pool applications are deployed beside the session stack under their own role names and
deleted afterwards, whatever happens.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from eft_serve.config import PoolConfig
from eft_serve.coordinator.vocabulary import check_shared_vocabulary
from eft_serve.engine.types import SequenceQuery
from eft_serve.preflight import StartupError
from eft_serve.serve.app import pool_app
from eft_serve.serve.local import wait_for_apps
from eft_serve.serve.names import pool_app_name
from eft_serve.serve.pool_handle import ServePoolClient
from eft_serve.testing.arch_families import build_arch_family, demo_tokenizer

pytestmark = pytest.mark.cluster


def _pool(model: Path) -> dict:
    # No CPUs reserved: the session's nodes are sized for its own pools; these are tiny.
    return PoolConfig(model=str(model), device="cpu", kv_cache_bytes=2**22, replica={"num_cpus": 0}).model_dump(
        mode="json"
    )


def _deploy(apps: dict[str, Path]) -> None:
    from ray import serve

    serve.run_many(
        [
            serve.RunTarget(pool_app({"role": role, "pool": _pool(path)}), name=pool_app_name(role), route_prefix=None)
            for role, path in apps.items()
        ],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )


def _delete(roles) -> None:
    from ray import serve

    for role in roles:
        serve.delete(pool_app_name(role), _blocking=True)


def test_pools_with_differently_padded_heads_share_one_vocabulary(cluster_stack, tmp_path) -> None:
    tok = demo_tokenizer()
    n = len(tok)
    family = build_arch_family("qwen2", tmp_path, tokenizer=tok, large_head_rows=n + 128, small_head_rows=n + 16)
    roles = {"padded_large": family.paths["large_base"], "padded_small": family.paths["small_base"]}
    try:
        _deploy(roles)
        wait_for_apps([pool_app_name(r) for r in roles], timeout_s=180)

        async def ask():
            clients = {r: ServePoolClient(r, coalesce=False) for r in roles}
            infos = {r: await c.info() for r, c in clients.items()}
            answers = {
                r: await c.next_token_logprobs([SequenceQuery(tok.encode("Q: Where"))], 0, time.time() + 60)
                for r, c in clients.items()
            }
            return infos, answers

        infos, answers = asyncio.run(ask())
        assert {r: i.vocab_size for r, i in infos.items()} == {r: n for r in roles}
        assert infos["padded_large"].extra["head_rows"] == str(n + 128)
        assert infos["padded_small"].extra["head_rows"] == str(n + 16)
        check_shared_vocabulary(infos)  # the coordinator's start-up rule: passes
        for role, results in answers.items():
            full = results[0].positions[0].full_logprobs
            assert full is not None and full.shape == (n,), role
    finally:
        _delete(roles)


def test_a_pool_that_cannot_load_fails_with_one_line_naming_it(cluster_stack, tmp_path) -> None:
    family = build_arch_family("llama", tmp_path / "fam")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in family.paths["small_base"].iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    try:
        _deploy({"broken_pool": broken})
        with pytest.raises(StartupError) as err:
            wait_for_apps([pool_app_name("broken_pool")], timeout_s=180)
        line = str(err.value)
        assert line.startswith("pool 'broken_pool': ") and "\n" not in line, line
        assert "Traceback" not in line
    finally:
        _delete(["broken_pool"])
