"""Every KV layout the transformers engine runs reproduces the plain forward, per architecture.

For each shape of `eft_serve.testing.arch_families` (GQA Llama, tied/biased Qwen2, partial-rotary
parallel-residual GPT-NeoX, soft-capped alternating-window Gemma-2, sliding-window Mistral; padded
heads throughout), each layout (``rows``, ``gather``, ``off``) is forced on a fresh copy of the
model and driven through a multi-step decode: a batched prefill of rows of different lengths (some
past the sliding window), decode steps where only some rows advance, and a trailing 3-token block
on a cached prefix. Every position's full distribution must equal an independent plain forward of
the whole prefix (another model instance, no padding, log-softmax over the tokenizer's ids).
A layout the engine cannot run for an architecture must be refused at construction, and ``auto``
must pick the layout the table below says.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from eft_serve.engine.hf_engine import HFEngine
from eft_serve.engine.types import SequenceQuery
from eft_serve.testing.arch_families import ARCHITECTURES, SLIDING_WINDOW, build_arch_family, demo_tokenizer

# What the engine runs per architecture ("auto" picks the first).
RUNNABLE: dict[str, tuple[str, ...]] = {
    "llama": ("rows", "gather", "off"),
    "qwen2": ("rows", "gather", "off"),
    "gpt_neox": ("rows", "gather", "off"),
    # Soft-capped attention runs eager in transformers (sdpa cannot cap): the eager row kernel.
    "gemma2": ("rows", "gather", "off"),
    "mistral": ("rows", "gather", "off"),
}
LAYOUTS = ("rows", "gather", "off")
TOL = 1e-4
KV_BYTES = 32 * 2**20
PROMPT_LENS = (5, SLIDING_WINDOW + 5, 2 * SLIDING_WINDOW + 5)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    tok = demo_tokenizer()
    root = tmp_path_factory.mktemp("arch_kv")
    return {a: build_arch_family(a, root / a, tokenizer=tok) for a in ARCHITECTURES}


def _fresh(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _engine(path: Path, layout: str) -> HFEngine:
    base = HFEngine.load(path, name=path.parent.name, device="cpu", kv_cache_bytes=0)
    info = dataclasses.replace(base.info, extra=dict(base.info.extra))
    return HFEngine(_fresh(path), info, kv_cache_bytes=KV_BYTES, kv_layout=layout)


def _reference(model, ids: list[int], m: int, support: int) -> np.ndarray:
    """The plain forward: log-softmax over the tokenizer's ids of the last m positions."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, len(ids) - m :, :support].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def _decode_and_compare(engine: HFEngine, ref_model, support: int) -> int:
    """Drive a multi-step batched decode; returns positions compared. Asserts each matches."""
    rng = np.random.default_rng(7)
    seqs = {f"s{i}": [int(x) for x in rng.integers(1, support, n)] for i, n in enumerate(PROMPT_LENS)}
    # (sequences that advance, tokens appended to each before the call, positions asked for)
    plan = [(("s0", "s1", "s2"), 0, 1), (("s0", "s1", "s2"), 1, 1), (("s0", "s2"), 1, 1)]
    plan += [(("s1",), 2, 1), (("s0", "s1", "s2"), 1, 1), (("s1", "s2"), 3, 3), (("s0", "s1", "s2"), 1, 1)]
    compared = 0
    for step, (names, grow, m) in enumerate(plan):
        for name in names:
            seqs[name] += [int(x) for x in rng.integers(1, support, grow)]
        queries = [SequenceQuery(seqs[n], num_positions=m, sequence_id=n) for n in names]
        results = engine.next_token_logprobs(queries, 0)
        for name, res in zip(names, results):
            want = _reference(ref_model, seqs[name], m, support)
            got = np.stack([p.full_logprobs for p in res.positions])
            assert got.shape == want.shape, (step, name)
            err = float(np.abs(got - want).max())
            assert err < TOL, f"{engine.info.name} {engine.kv_layout}: step {step} {name} max |Δ| {err:.3g}"
            compared += m
    return compared


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_auto_layout_is_the_first_runnable_one(families, arch: str) -> None:
    engine = HFEngine.load(families[arch].paths["large_base"], name=arch, device="cpu", kv_cache_bytes=KV_BYTES)
    assert engine.kv_layout == RUNNABLE[arch][0]
    assert engine.info.extra["kv_layout"] == engine.kv_layout


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layout_reproduces_plain_forward_over_a_decode(families, arch: str, layout: str) -> None:
    fam = families[arch]
    for role in ("large_base", "small_base"):
        path = fam.paths[role]
        if layout not in RUNNABLE[arch]:
            with pytest.raises(ValueError, match="kv_layout"):
                _engine(path, layout)
            continue
        engine = _engine(path, layout)
        assert engine.kv_layout == layout
        compared = _decode_and_compare(engine, _fresh(path), fam.tokenizer_size)
        assert compared == 3 + 3 + 2 + 1 + 3 + 6 + 3
        counters = engine.counters
        if layout == "off":
            assert counters.cached_tokens == 0
        else:
            # The KV really was reused (later steps fed only new tokens) ...
            assert counters.cached_tokens > 0
            assert counters.new_tokens < sum(PROMPT_LENS) + 40
            # ... and only the gather layout copies pasts into a padded batch.
            assert (counters.gathered_tokens > 0) == (layout == "gather")


def test_a_layout_the_model_cannot_run_is_refused(families) -> None:
    # Llama put on eager attention by choice keeps it (no row kernel): "rows" is refused, gather runs.
    path = families["llama"].paths["small_base"]
    base = HFEngine.load(path, name="llama", device="cpu", kv_cache_bytes=0)
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with pytest.raises(ValueError, match="kv_layout 'rows' asked for.*runs 'gather'"):
        HFEngine(eager, dataclasses.replace(base.info, extra={}), kv_cache_bytes=KV_BYTES, kv_layout="rows")
    with pytest.raises(ValueError, match="kv_layout must be one of"):
        HFEngine(eager, dataclasses.replace(base.info, extra={}), kv_layout="paged")
    # No KV budget: only "off" runs.
    with pytest.raises(ValueError, match="kv_layout 'gather' asked for.*runs 'off'"):
        HFEngine(_fresh(path), dataclasses.replace(base.info, extra={}), kv_cache_bytes=0, kv_layout="gather")
