"""A LoRA expert co-located in its base's pool, through real Ray Serve pool replicas.

Deploys its own pool application (`pool-loratest_small_base`: the demo small base with a random
LoRA adapter inside, built by `serve.app.pool_app` from the same `lora` args `eft serve` renders)
on the small_base node group; the stack's pools stay untouched. A coordinator in the test process
reaches it and the stack's large_base pool through `ServePoolClient` (the coordinator replica's
client: KV-affinity routing, coalescing, the protobuf wire with per-sequence adapter names). Exact
greedy up-scaling must equal the reference on the adapter merged into its base, at 2 pool calls a
token; the application is deleted at the end.
"""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from eft_serve.config import CoordinatorConfig, PoolConfig, demo_config
from eft_serve.coordinator.pool_client import ColocatedRole
from eft_serve.coordinator.request import GenerationRequest, MergeOptions
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.core.recipe import resolve_recipe
from eft_serve.reference import ReferenceEFT
from eft_serve.serve.names import pool_app_name
from eft_serve.testing.lora_fixtures import make_lora_adapter, merged_model_dir

pytestmark = pytest.mark.cluster

HOST = "loratest_small_base"  # its own app, never part of the stack's config
ADAPTER = "loratest_small_ft"
TOKENS = 12


def test_colocated_adapter_through_serve_equals_merged_reference(cluster_stack, tmp_path_factory) -> None:
    from ray import serve

    from eft_serve.serve.app import pool_app
    from eft_serve.serve.local import wait_for_apps
    from eft_serve.serve.pool_handle import ServePoolClient

    family = cluster_stack["family"]
    base = family.paths["small_base"]
    root = tmp_path_factory.mktemp("lora_serve")
    adapter = make_lora_adapter(base, root / "adapter", seed=3, std=0.2)
    merged = merged_model_dir(base, adapter, root / "merged")
    small = cluster_stack["config"].pools["small_base"]
    pool = PoolConfig(
        model=str(base),
        replica=dict(num_cpus=0.5, max_ongoing_requests=64, node_group_resource=small.replica.node_group_resource),
    )
    app = pool_app_name(HOST)
    tok = AutoTokenizer.from_pretrained(base)
    recipe = resolve_recipe(demo_config().recipes, "upscale", beta=1.0)
    reference = ReferenceEFT({**family.paths, "small_ft": merged}, recipe.coefficients())
    prompts = [q.prompt for q in family.world.held_out_questions()[:2]]
    try:
        args = {"role": HOST, "pool": pool.model_dump(mode="json"), "lora": {"adapters": {ADAPTER: str(adapter)}}}
        serve.run(pool_app(args), name=app, route_prefix=None)
        wait_for_apps([app], timeout_s=180)

        async def scenario() -> list[tuple[list[int], int, int]]:
            host = ServePoolClient(HOST)
            pools = {
                "large_base": ServePoolClient("large_base"),
                "small_base": host,
                "small_ft": ColocatedRole("small_ft", host, adapter=ADAPTER),
            }
            coord = EftCoordinator(pools, demo_config().recipes, tok, CoordinatorConfig(pool_call_timeout_s=30))
            await coord.start()
            assert coord.infos["small_ft"].model_fingerprint != coord.infos["small_base"].model_fingerprint
            out = []
            try:
                for prompt in prompts:
                    request = GenerationRequest(
                        prompt=prompt,
                        merge=MergeOptions(logprob_top_k=0),
                        temperature=0,
                        max_new_tokens=TOKENS,
                        ignore_eos=True,
                    )
                    chunks = [c async for c in await coord.generate(request)]
                    usage = chunks[-1].usage
                    assert usage is not None
                    ids = [t.token_id for c in chunks for t in c.tokens]
                    out.append((ids, usage.fetch.pool_calls, usage.completion_tokens))
            finally:
                await coord.stop()
            return out

        results = asyncio.run(scenario())
    finally:
        serve.delete(app, _blocking=True)
    for prompt, (ids, calls, n) in zip(prompts, results):
        expected, _ = reference.greedy(tok.encode(prompt), TOKENS)
        assert ids == expected, f"diverged on {prompt!r}"
        assert n == TOKENS and calls == 2 * TOKENS
