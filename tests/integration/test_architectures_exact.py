"""Exact-mode up-scaling through the coordinator, per architecture, with padded output heads.

Each shape of `eft_serve.testing.arch_families` (Llama GQA, Qwen2 tied + qkv bias, GPT-NeoX partial
rotary + parallel residual, Gemma-2 soft-capping + alternating sliding windows, Mistral sliding
window) is served by three HF engines whose heads are padded beyond the 768-id tokenizer, the
large one more (1024 rows) than the small pair (896), behind the coordinator over the in-process
transport and over real gRPC on loopback. Greedy exact mode (``logprob_top_k = 0``), plain and
speculative, must equal token for token an independent reference that merges over the
tokenizer's ids only (a difference is allowed only at a near tie, which ends the comparison), and
no generated id may fall outside the tokenizer.

The padded rows are made attractive (`attractive_padding`): a merge over the padded heads would
pick a padded id at the first step (checked), so a pool that let padded rows into its
distributions would fail here, not pass by luck. The small pair also moves the merge away from
the large base alone (checked), so the delta is in play.
"""

from __future__ import annotations

import pytest
import torch

from eft_serve.config import CoordinatorConfig, demo_config
from eft_serve.coordinator.request import GenerationRequest, MergeOptions, SpeculativeOptions
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.core.recipe import resolve_recipe
from eft_serve.engine.hf_engine import HFEngine
from eft_serve.reference import ReferenceEFT
from eft_serve.testing.arch_families import ARCHITECTURES, ROLES, build_arch_family, demo_tokenizer, merged_scores
from eft_serve.testing.greedy_agreement import agreed_tokens
from eft_serve.testing.grpc_coordinator import start_pool_server
from eft_serve.testing.grpc_pool import GrpcPoolClient
from eft_serve.transport.inprocess import InProcessPool
from eft_serve.transport.pool_rpc import PoolRpc

TOKENS = 16
NOISE = 1e-4
PROMPTS = (
    "Where does the old dragon live? It lives in",
    "Q: What colour is the sky over the northern sea?\nA:",
)


@pytest.fixture(scope="module")
def tokenizer():
    return demo_tokenizer()


@pytest.fixture(scope="module")
def coefficients() -> dict[str, float]:
    return resolve_recipe(demo_config().recipes, "upscale", beta=1.0).coefficients()


async def _generate(coord: EftCoordinator, prompt: str, top_k: int, speculative: bool = False) -> list[int]:
    stream = await coord.generate(
        GenerationRequest(
            prompt=prompt,
            merge=MergeOptions(recipe="upscale", beta=1.0, logprob_top_k=top_k),
            temperature=0,
            max_new_tokens=TOKENS,
            ignore_eos=True,
            speculative=SpeculativeOptions(enabled=speculative),
        )
    )
    return [t.token_id for c in [c async for c in stream] for t in c.tokens]


@pytest.mark.parametrize("transport", ["inprocess", "grpc"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
async def test_exact_upscaling_matches_reference_over_tokenizer_ids(
    arch: str, transport: str, tokenizer, coefficients, tmp_path
) -> None:
    fam = build_arch_family(arch, tmp_path / arch, tokenizer=tokenizer, attractive_padding=True)
    n_tok = fam.tokenizer_size
    assert n_tok == len(tokenizer) and min(fam.head_rows.values()) > n_tok
    assert fam.head_rows["large_base"] > fam.head_rows["small_base"]
    engines = {r: HFEngine.load(fam.paths[r], name=f"{arch}-{r}", device="cpu") for r in ROLES}
    for role, e in engines.items():
        assert e.info.vocab_size == n_tok
        assert e.info.extra["head_rows"] == str(fam.head_rows[role])

    servers, clients = [], []
    if transport == "grpc":
        pools = {}
        for role, e in engines.items():
            server, port = await start_pool_server(PoolRpc(e, role))
            servers.append(server)
            pools[role] = GrpcPoolClient(f"127.0.0.1:{port}", role, timeout_s=30.0)
            clients.append(pools[role])
    else:
        pools = {r: InProcessPool(e, r) for r, e in engines.items()}
    coord = EftCoordinator(pools, demo_config().recipes, tokenizer, CoordinatorConfig(max_new_tokens_cap=256))
    reference = ReferenceEFT(fam.paths, coefficients, support=n_tok)
    try:
        await coord.start()
        compared = moved = 0
        for prompt in PROMPTS:
            prompt_ids = tokenizer.encode(prompt)
            # The test has teeth: over the padded heads the merge would pick a padded row.
            padded = merged_scores(reference.models, coefficients, prompt_ids, min(fam.head_rows.values()))
            assert int(torch.argmax(padded)) >= n_tok
            expected, _ = reference.greedy(prompt_ids, TOKENS)
            alone, _ = ReferenceEFT(fam.paths, {"large_base": 1.0}, support=n_tok).greedy(prompt_ids, TOKENS)
            moved += expected != alone
            got = await _generate(coord, prompt, top_k=0)
            fast = await _generate(coord, prompt, top_k=0, speculative=True)
            approx = await _generate(coord, prompt, top_k=20)
            for ids in (got, fast, approx):
                assert len(ids) == TOKENS and max(ids) < n_tok, ids
            compared += agreed_tokens(got, expected, reference, prompt_ids, NOISE, f"{arch} {prompt!r}")
            compared += agreed_tokens(fast, expected, reference, prompt_ids, NOISE, f"{arch} spec {prompt!r}")
        assert moved >= 1, "the small pair never changed the large base's choice"
        # Only a near tie (float rounding) may end a comparison early; that is rare.
        assert compared >= 3 * TOKENS
    finally:
        await coord.stop()
        for c in clients:
            await c.close()
        for s in servers:
            await s.stop(grace=None)
