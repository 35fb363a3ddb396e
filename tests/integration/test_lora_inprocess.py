"""LoRA fine-tunes as experts, in process: a random-weight adapter over the demo small base is the
up-scaling expert, served in a pool of its own (merged) or co-located in the small base's pool.

Exact greedy up-scaling must equal the independent reference run on the adapter merged into its
base (`merge_and_unload`, saved as a plain model directory) in both modes; the co-located mode
costs 2 pool calls a token (the small base's and the adapter's queries share one call) where the
separate mode costs 3.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from eft_serve.cache.memory import MemoryCache
from eft_serve.cache.next_token_cache import NextTokenCache
from eft_serve.config import CoordinatorConfig, demo_config
from eft_serve.coordinator.pool_client import ColocatedRole
from eft_serve.coordinator.request import GenerationRequest, MergeOptions, SpeculativeOptions
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.core.recipe import resolve_recipe
from eft_serve.engine.hf_engine import HFEngine
from eft_serve.reference import ReferenceEFT
from eft_serve.testing.lora_fixtures import make_lora_adapter, merged_model_dir
from eft_serve.transport.inprocess import InProcessPool


@pytest.fixture(scope="module")
def lora_family(demo_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = demo_family.paths["small_base"]
    adapter = make_lora_adapter(base, root / "adapter", seed=3, std=0.2)
    return {
        "family": demo_family,
        "adapter": adapter,
        "merged": merged_model_dir(base, adapter, root / "merged"),
        "tokenizer": AutoTokenizer.from_pretrained(base),
    }


def _coordinator(pools, tokenizer, cache=None) -> EftCoordinator:
    return EftCoordinator(
        pools, demo_config().recipes, tokenizer, CoordinatorConfig(max_new_tokens_cap=256), cache=cache
    )


@pytest.fixture(scope="module")
def stacks(lora_family):
    fam = lora_family["family"]
    large = InProcessPool(HFEngine.load(fam.paths["large_base"], name="large_base", device="cpu"), "large_base")
    small = HFEngine.load(fam.paths["small_base"], name="small_base", device="cpu")
    merged_ft = HFEngine.load(
        fam.paths["small_base"], name="small_ft", device="cpu", merge_adapter=lora_family["adapter"]
    )
    separate = {
        "large_base": large,
        "small_base": InProcessPool(small, "small_base"),
        "small_ft": InProcessPool(merged_ft, "small_ft"),
    }
    host = InProcessPool(
        HFEngine.load(
            fam.paths["small_base"], name="small_base", device="cpu", adapters={"small_ft": lora_family["adapter"]}
        ),
        "small_base",
    )
    colocated = {"large_base": large, "small_base": host, "small_ft": ColocatedRole("small_ft", host)}
    return {"separate": separate, "colocated": colocated, "tokenizer": lora_family["tokenizer"]}


async def _run(coord, prompt: str, n: int, **kw):
    speculative = kw.pop("speculative", False)
    ignore_eos = kw.pop("ignore_eos", False)
    stream = await coord.generate(
        GenerationRequest(
            prompt=prompt,
            merge=MergeOptions(**kw),
            temperature=0,
            max_new_tokens=n,
            ignore_eos=ignore_eos,
            speculative=SpeculativeOptions(enabled=speculative),
        )
    )
    chunks = [c async for c in stream]
    return [t.token_id for c in chunks for t in c.tokens], chunks[-1].usage


@pytest.mark.parametrize("mode", ["separate", "colocated"])
async def test_exact_upscaling_with_adapter_equals_reference_on_merged_adapter(lora_family, stacks, mode) -> None:
    coord = _coordinator(stacks[mode], stacks["tokenizer"])
    await coord.start()
    fam, tok = lora_family["family"], lora_family["tokenizer"]
    recipe = resolve_recipe(demo_config().recipes, "upscale", beta=1.0)
    reference = ReferenceEFT({**fam.paths, "small_ft": lora_family["merged"]}, recipe.coefficients())
    # The adapter matters: the reference with the plain base as the expert decodes differently.
    plain = ReferenceEFT({**fam.paths, "small_ft": fam.paths["small_base"]}, recipe.coefficients())
    differs = 0
    for q in fam.world.held_out_questions()[:3]:
        ids = tok.encode(q.prompt)
        expected, _ = reference.greedy(ids, 16, eos_token_id=tok.eos_token_id)
        differs += expected != plain.greedy(ids, 16, eos_token_id=tok.eos_token_id)[0]
        got, _ = await _run(coord, q.prompt, 16, recipe="upscale", beta=1.0, logprob_top_k=0)
        assert got == expected, f"{mode}: diverged on {q.prompt!r}"
        fast, _ = await _run(coord, q.prompt, 16, recipe="upscale", beta=1.0, logprob_top_k=0, speculative=True)
        assert fast == expected, f"{mode}: speculative diverged on {q.prompt!r}"
    assert differs, "the random adapter changed no greedy output: the test would not see it ignored"
    # The expert alone (the adapter's own recipe) matches the merged model too.
    ft_alone = ReferenceEFT({"small_ft": lora_family["merged"]}, {"small_ft": 1.0})
    q = fam.world.held_out_questions()[0]
    got, _ = await _run(coord, q.prompt, 12, recipe="small_ft", logprob_top_k=0)
    assert got == ft_alone.greedy(tok.encode(q.prompt), 12, eos_token_id=tok.eos_token_id)[0]
    await coord.stop()


@pytest.mark.parametrize(("mode", "calls_per_token"), [("separate", 3), ("colocated", 2)])
async def test_pool_calls_per_token(lora_family, stacks, mode, calls_per_token) -> None:
    coord = _coordinator(stacks[mode], stacks["tokenizer"])
    await coord.start()
    prompt = lora_family["family"].world.held_out_questions()[1].prompt
    for top_k in (0, 20):
        ids, usage = await _run(coord, prompt, 10, recipe="upscale", logprob_top_k=top_k, ignore_eos=True)
        assert len(ids) == usage.completion_tokens == 10
        assert usage.fetch.pool_calls == calls_per_token * 10
    await coord.stop()


async def test_cache_keys_name_the_adapter(lora_family, stacks) -> None:
    # Same prefix, base vs adapter: different weights fingerprints, so different result-cache keys;
    # a warm run answers from the cache alone and decodes the same tokens.
    cache = NextTokenCache(MemoryCache(64 * 2**20))
    coord = _coordinator(stacks["colocated"], stacks["tokenizer"], cache=cache)
    await coord.start()
    assert coord.infos["small_ft"].model_fingerprint != coord.infos["small_base"].model_fingerprint
    prompt = lora_family["family"].world.held_out_questions()[2].prompt
    cold, cold_usage = await _run(coord, prompt, 8, recipe="upscale", logprob_top_k=20, ignore_eos=True)
    warm, warm_usage = await _run(coord, prompt, 8, recipe="upscale", logprob_top_k=20, ignore_eos=True)
    assert warm == cold and cold_usage.fetch.pool_calls == 16 and warm_usage.fetch.pool_calls == 0
    # Three entries per step (large base, small base, adapter), none shared between base and adapter.
    assert cold_usage.fetch.cache_misses == 3 * 8
    await coord.stop()
