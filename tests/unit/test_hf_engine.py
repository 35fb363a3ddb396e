"""HFEngine on a tiny random GPT-2: record invariants, cache/batching invariance, validation, drafts.

Set EFT_TEST_DEVICE=cuda to run the same checks on a GPU (default: cpu).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from eft_serve.engine.fingerprint import model_fingerprint, vocab_fingerprint
from eft_serve.engine.hf_engine import HFEngine
from eft_serve.engine.types import DraftQuery, LogprobEngine, SequenceQuery

V = 300
CTX = 64
DEVICE = os.environ.get("EFT_TEST_DEVICE", "cpu")
TOL = 1e-4


def make_tokenizer(vocab_size: int = V, extra: str = "") -> PreTrainedTokenizerFast:
    vocab = {f"t{i}{extra}": i for i in range(vocab_size - 1)}
    vocab["<eos>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0" + extra))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="t0" + extra)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer().save_pretrained(path)
    torch.manual_seed(seed)
    # A large init makes distributions peaked, so argmax chains and top-k are not coin flips.
    config = GPT2Config(
        vocab_size=V,
        n_positions=CTX,
        n_embd=32,
        n_layer=2,
        n_head=2,
        initializer_range=0.3,
        bos_token_id=V - 1,
        eos_token_id=V - 1,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture()
def engine(model_dir) -> HFEngine:
    return HFEngine.load(model_dir, name="tiny", device=DEVICE, torch_threads=None)


@pytest.fixture(scope="module")
def ref_engine(model_dir) -> HFEngine:
    """No KV cache: every answer is a fresh full forward."""
    return HFEngine.load(model_dir, name="tiny", device=DEVICE, kv_cache_bytes=0, torch_threads=None)


def fresh_full(ref: HFEngine, prefix) -> np.ndarray:
    """Full-vocab logprobs after ``prefix`` from a single uncached forward."""
    return (
        ref.next_token_logprobs([SequenceQuery(token_ids=list(prefix))], logprob_top_k=0)[0].positions[0].full_logprobs
    )


def rand_tokens(rng, n):
    return rng.integers(0, V, size=n).tolist()


def test_info(engine, model_dir):
    info = engine.info
    as_protocol: LogprobEngine = engine  # static check only (the protocol is not runtime_checkable)
    assert callable(as_protocol.next_token_logprobs) and callable(as_protocol.draft)
    assert info.vocab_size == V and info.max_context == CTX and info.eos_token_id == V - 1
    assert info.num_parameters > 0 and info.dtype == "float32"
    assert info.device.startswith(DEVICE)
    assert info.model_fingerprint == model_fingerprint(model_dir)
    assert len(info.vocab_fingerprint) == 64
    # float32 on CPU: decode steps use the few-row head kernel (engine.cpu_head).
    assert info.extra["lm_head"] == ("cpu_decode" if DEVICE == "cpu" else "model")


def test_topk_tail_candidates_and_full(engine):
    rng = np.random.default_rng(1)
    toks = rand_tokens(rng, 10)
    cands = [0, 5, 299, 5]
    topk = engine.next_token_logprobs([SequenceQuery(toks, 3, cands)], logprob_top_k=8)[0]
    full = engine.next_token_logprobs([SequenceQuery(toks, 3, cands)], logprob_top_k=0)[0]
    assert len(topk.positions) == len(full.positions) == 3
    for p, f in zip(topk.positions, full.positions):
        assert p.top_ids.dtype == np.int64 and p.top_ids.shape == (8,)
        assert p.top_logprobs.dtype == np.float32 and p.full_logprobs is None
        assert np.all(np.diff(p.top_logprobs) <= 0)
        total = np.logaddexp(np.logaddexp.reduce(p.top_logprobs.astype(np.float64)), p.tail_logmass)
        assert abs(total) < 1e-4
        fl = f.full_logprobs
        assert fl.dtype == np.float32 and fl.shape == (V,) and f.top_ids.size == 0
        assert f.tail_logmass == -math.inf
        assert abs(np.logaddexp.reduce(fl.astype(np.float64))) < 1e-4
        np.testing.assert_allclose(p.top_logprobs, fl[p.top_ids], atol=TOL)
        np.testing.assert_array_equal(p.top_ids, np.argsort(-fl, kind="stable")[:8])
        np.testing.assert_allclose(p.candidate_logprobs, fl[cands], atol=TOL)
        np.testing.assert_allclose(f.candidate_logprobs, fl[cands], atol=TOL)
    # top_k >= vocab: everything is "top", nothing left in the tail.
    allk = engine.next_token_logprobs([SequenceQuery(toks)], logprob_top_k=V + 5)[0].positions[0]
    assert allk.top_ids.shape == (V,) and allk.tail_logmass == -math.inf


def test_num_positions_match_shorter_prefixes(engine, ref_engine):
    rng = np.random.default_rng(2)
    toks = rand_tokens(rng, 12)
    res = engine.next_token_logprobs([SequenceQuery(toks, num_positions=4)], logprob_top_k=0)[0]
    for j, pos in enumerate(res.positions):
        np.testing.assert_allclose(pos.full_logprobs, fresh_full(ref_engine, toks[: 12 - 4 + 1 + j]), atol=TOL)


def test_cache_hit_equals_fresh_forward(engine, ref_engine):
    rng = np.random.default_rng(3)
    base = rand_tokens(rng, 20)
    first = engine.next_token_logprobs([SequenceQuery(base, sequence_id="s")], logprob_top_k=0)[0]
    assert first.cached_tokens == 0
    # Extend by a few tokens and score a trailing block: served over the cached prefix.
    ext = base + rand_tokens(rng, 3)
    res = engine.next_token_logprobs([SequenceQuery(ext, num_positions=2, sequence_id="s")], logprob_top_k=0)[0]
    assert res.cached_tokens == 20
    for j, pos in enumerate(res.positions):
        np.testing.assert_allclose(pos.full_logprobs, fresh_full(ref_engine, ext[: len(ext) - 1 + j]), atol=TOL)
    # The exact same prefix again: the cache holds all of it but the last token is recomputed.
    again = engine.next_token_logprobs([SequenceQuery(ext)], logprob_top_k=0)[0]
    assert again.cached_tokens == len(ext) - 1
    np.testing.assert_allclose(again.positions[0].full_logprobs, fresh_full(ref_engine, ext), atol=TOL)
    # A diverging sequence reuses only the shared part.
    div = base[:10] + rand_tokens(rng, 5)
    dres = engine.next_token_logprobs([SequenceQuery(div)], logprob_top_k=0)[0]
    assert dres.cached_tokens == 10
    np.testing.assert_allclose(dres.positions[0].full_logprobs, fresh_full(ref_engine, div), atol=TOL)
    s = engine.kv_cache.stats()
    assert s.hits >= 3 and s.hit_tokens >= 20


def test_batched_equals_per_query(engine, ref_engine):
    rng = np.random.default_rng(4)
    # Warm the cache with prefixes of different lengths, then ask for a few new tokens each:
    # the common decode step, batched over different cached lengths.
    bases = [rand_tokens(rng, n) for n in (5, 17, 30, 9)]
    engine.next_token_logprobs([SequenceQuery(b, sequence_id=f"q{i}") for i, b in enumerate(bases)], logprob_top_k=4)
    queries = [
        SequenceQuery(bases[0] + rand_tokens(rng, 1), 1, [1, 2], sequence_id="q0"),
        SequenceQuery(bases[1] + rand_tokens(rng, 3), 2, [3], sequence_id="q1"),
        SequenceQuery(bases[2] + rand_tokens(rng, 2), 3, [], sequence_id="q2"),
        SequenceQuery(bases[3] + rand_tokens(rng, 1), 1, [7], sequence_id="q3"),
        SequenceQuery(rand_tokens(rng, 6), 2, [8, 9]),  # a fresh one in the same batch
    ]
    before = engine.counters.forward_passes
    batched = engine.next_token_logprobs(queries, logprob_top_k=0)
    assert engine.counters.forward_passes - before == 1, "one padded forward for the whole batch"
    # cached_len is capped at len - num_positions (those logits must be computed)
    assert [r.cached_tokens for r in batched] == [5, 17, 29, 9, 0]
    for q, res in zip(queries, batched):
        single = ref_engine.next_token_logprobs([q], logprob_top_k=0)[0]
        assert len(res.positions) == q.num_positions
        for a, b in zip(res.positions, single.positions):
            np.testing.assert_allclose(a.full_logprobs, b.full_logprobs, atol=TOL)
            np.testing.assert_allclose(a.candidate_logprobs, b.candidate_logprobs, atol=TOL)
    # Uncached batch of mixed lengths also equals per-query results.
    fresh = [SequenceQuery(rand_tokens(rng, n), m) for n, m in ((4, 1), (4, 2), (7, 1), (40, 5))]
    out = ref_engine.next_token_logprobs(fresh, logprob_top_k=0)
    for q, res in zip(fresh, out):
        for j, pos in enumerate(res.positions):
            prefix = list(q.token_ids)[: len(q.token_ids) - q.num_positions + 1 + j]
            np.testing.assert_allclose(pos.full_logprobs, fresh_full(ref_engine, prefix), atol=TOL)


def test_small_batch_budget_splits_groups(model_dir, ref_engine):
    eng = HFEngine.load(model_dir, name="tiny", device=DEVICE, max_batch_tokens=16, torch_threads=None)
    rng = np.random.default_rng(5)
    queries = [SequenceQuery(rand_tokens(rng, n)) for n in (10, 10, 3, 12)]
    res = eng.next_token_logprobs(queries, logprob_top_k=0)
    assert eng.counters.forward_passes >= 3
    for q, r in zip(queries, res):
        np.testing.assert_allclose(r.positions[0].full_logprobs, fresh_full(ref_engine, q.token_ids), atol=TOL)


def test_bad_inputs_raise_value_error(engine):
    bad = [
        SequenceQuery([]),
        SequenceQuery([1, V]),
        SequenceQuery([-1, 2]),
        SequenceQuery(list(range(CTX + 1))),
        SequenceQuery([1, 2], num_positions=0),
        SequenceQuery([1, 2], num_positions=3),
        SequenceQuery([1, 2], candidate_ids=[V]),
    ]
    for q in bad:
        with pytest.raises(ValueError):
            engine.next_token_logprobs([SequenceQuery([1, 2, 3]), q], logprob_top_k=5)
    with pytest.raises(ValueError):
        engine.next_token_logprobs([SequenceQuery([1])], logprob_top_k=-1)
    with pytest.raises(ValueError):
        engine.draft([DraftQuery(list(range(CTX)), num_tokens=2)])
    with pytest.raises(ValueError):
        engine.draft([DraftQuery([1], num_tokens=-1)])
    assert engine.next_token_logprobs([], logprob_top_k=3) == []
    # A prompt of exactly max_context is fine.
    assert len(engine.next_token_logprobs([SequenceQuery(list(range(CTX)))], logprob_top_k=1)[0].positions) == 1


def test_kv_cache_bytes_bounded(model_dir):
    budget = 40_000
    eng = HFEngine.load(model_dir, name="tiny", device=DEVICE, kv_cache_bytes=budget, torch_threads=None)
    rng = np.random.default_rng(6)
    for i in range(12):
        eng.next_token_logprobs([SequenceQuery(rand_tokens(rng, 30), sequence_id=f"s{i}")], logprob_top_k=2)
        assert eng.kv_cache.stats().bytes <= budget
    s = eng.kv_cache.stats()
    assert s.evictions > 0 and s.entries >= 1


def test_draft_equals_argmax_chain(engine, ref_engine):
    rng = np.random.default_rng(7)
    prompts = [rand_tokens(rng, 5), rand_tokens(rng, 11), rand_tokens(rng, 2)]
    ks = [6, 3, 0]
    drafts = engine.draft([DraftQuery(p, k, f"d{i}") for i, (p, k) in enumerate(zip(prompts, ks))])
    assert [len(d) for d in drafts] == ks
    for p, d in zip(prompts, drafts):
        seq = list(p)
        for t in d:
            assert t == int(np.argmax(fresh_full(ref_engine, seq)))
            seq.append(t)
    # The drafted prefix is now cached: scoring the draft reuses it and agrees.
    seq = prompts[0] + drafts[0]
    res = engine.next_token_logprobs([SequenceQuery(seq, num_positions=6, sequence_id="d0")], logprob_top_k=1)[0]
    assert res.cached_tokens == len(seq) - 6
    assert [int(p.top_ids[0]) for p in res.positions[:-1]] == drafts[0][1:]
    # Without a cache the draft is the same.
    assert ref_engine.draft([DraftQuery(prompts[1], 3)]) == [drafts[1]]


def test_fingerprints(tmp_path, model_dir):
    a, b = make_tokenizer(), make_tokenizer()
    assert vocab_fingerprint(a) == vocab_fingerprint(b)
    assert vocab_fingerprint(a) != vocab_fingerprint(make_tokenizer(extra="x"))
    assert vocab_fingerprint(a) != vocab_fingerprint(make_tokenizer(V + 1))
    assert model_fingerprint(model_dir) == model_fingerprint(str(model_dir))
    other = save_tiny_model(tmp_path / "other", seed=1)
    assert model_fingerprint(other) != model_fingerprint(model_dir)
    same = save_tiny_model(tmp_path / "same", seed=0)
    assert model_fingerprint(same) == model_fingerprint(model_dir)
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path)


def test_load_rejects_missing_dir_and_bad_dtype(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError):
        HFEngine.load(tmp_path / "nope", name="x", torch_threads=None)
    with pytest.raises(ValueError):
        HFEngine.load(model_dir, name="x", dtype="float8", torch_threads=None)


def test_rope_gqa_model_batched_over_cache(tmp_path):
    """Llama-style (RoPE + grouped KV heads): explicit position_ids keep padded batches exact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    make_tokenizer().save_pretrained(tmp_path)
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=CTX,
            initializer_range=0.3,
        )
    ).save_pretrained(tmp_path)
    eng = HFEngine.load(tmp_path, name="llama", device=DEVICE, torch_threads=None)
    ref = HFEngine.load(tmp_path, name="llama", device=DEVICE, kv_cache_bytes=0, torch_threads=None)
    rng = np.random.default_rng(8)
    bases = [rand_tokens(rng, n) for n in (5, 17, 30)]
    eng.next_token_logprobs([SequenceQuery(b) for b in bases], logprob_top_k=1)
    queries = [SequenceQuery(b + rand_tokens(rng, k), k) for b, k in zip(bases, (1, 3, 2))]
    out = eng.next_token_logprobs(queries, logprob_top_k=0)
    assert [r.cached_tokens for r in out] == [5, 17, 30]
    for q, r in zip(queries, out):
        n = len(q.token_ids)
        for j, pos in enumerate(r.positions):
            prefix = list(q.token_ids)[: n - q.num_positions + 1 + j]
            np.testing.assert_allclose(pos.full_logprobs, fresh_full(ref, prefix), atol=TOL)
