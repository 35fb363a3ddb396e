"""HFEngine + EngineRunner under KV pressure (real tiny GPT-2): a call that does not fit waits,
then runs once running sequences go idle, or is refused with RESOURCE_EXHAUSTED — and a running
sequence's KV is never evicted for it. The row KV layout decodes without copying any past."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from eft_serve.config import PoolConfig
from eft_serve.engine.hf_engine import HFEngine
from eft_serve.engine.runner import EngineRunner
from eft_serve.engine.sequence_kv import SequenceKVStore
from eft_serve.engine.turn_queue import TurnPolicy
from eft_serve.engine.types import SequenceQuery
from eft_serve.errors import ResourceExhausted

V, CTX, TOL = 300, 64, 1e-4
DEVICE = os.environ.get("EFT_TEST_DEVICE", "cpu")
# Chunked prefill in 16-position chunks, with the companions wait that keeps a decoder in each turn.
CHUNKS_OF_16 = TurnPolicy(max_prefill_tokens=16, wait_s=0.05)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_gpt2_admission")
    vocab = {f"t{i}": i for i in range(V - 1)} | {"<eos>": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="t0").save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=CTX, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ref(model_dir) -> HFEngine:
    eng = HFEngine.load(model_dir, name="ref", device=DEVICE, kv_cache_bytes=0, torch_threads=None)
    assert eng.kv_layout == "off"
    return eng


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tight_engine(model_dir: Path, clock: Clock) -> HFEngine:
    """Room for two 30-token sequences (each holds a 48-position buffer of 512 bytes a position)."""
    eng = HFEngine.load(model_dir, name="tight", device=DEVICE, torch_threads=None)
    eng.kv_cache = SequenceKVStore(2 * 48 * 512 + 8000, eng.kv_cache.geometry, clock=clock)
    assert eng.kv_cache.bytes_per_token == 512 and eng.kv_layout == "rows"
    return eng


def prompts(seed: int, k: int, n: int = 30) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V - 1, size=n).tolist() for _ in range(k)]


def full(ref: HFEngine, toks: list[int]) -> np.ndarray:
    return ref.next_token_logprobs([SequenceQuery(toks)], 0)[0].positions[0].full_logprobs


async def test_waits_for_room_then_runs_without_evicting_running_sequences(model_dir, ref) -> None:
    clock = Clock()
    eng = tight_engine(model_dir, clock)
    runner = EngineRunner(eng, "large_base", admission_timeout_s=30)
    a, b, c = prompts(1, 3)
    await runner.next_token_logprobs([SequenceQuery(a, sequence_id="a"), SequenceQuery(b, sequence_id="b")], 0)
    waiting = asyncio.ensure_future(runner.next_token_logprobs([SequenceQuery(c, sequence_id="c")], 0))
    await asyncio.sleep(0.3)
    assert not waiting.done() and runner.admission_waits == 1
    # The running sequences keep stepping on their cached KV meanwhile.
    for i in range(3):
        a, b = a + [i], b + [i]
        res = await runner.next_token_logprobs(
            [SequenceQuery(a, sequence_id="a"), SequenceQuery(b, sequence_id="b")], 0
        )
        assert [r.cached_tokens for r in res] == [len(a) - 1, len(b) - 1]
    assert eng.kv_cache.stats().evictions == 0 and not waiting.done()
    clock.now += 31  # a and b finished: past their idle window
    res = (await asyncio.wait_for(waiting, 5))[0]
    np.testing.assert_allclose(res.positions[0].full_logprobs, full(ref, c), atol=TOL)
    s = eng.kv_cache.stats()
    assert s.evictions >= 1 and s.bytes <= eng.kv_cache.max_bytes and runner.admission_refusals == 0


async def test_refused_after_the_bounded_wait_and_running_kv_is_kept(model_dir) -> None:
    clock = Clock()
    eng = tight_engine(model_dir, clock)
    runner = EngineRunner(eng, "large_base", admission_timeout_s=0.3)
    a, b, c = prompts(2, 3)
    await runner.next_token_logprobs([SequenceQuery(a, sequence_id="a"), SequenceQuery(b, sequence_id="b")], 0)
    with pytest.raises(ResourceExhausted, match=r"large_base.*no KV cache room.*kv_cache_bytes") as exc:
        await runner.next_token_logprobs([SequenceQuery(c, sequence_id="c")], 0)
    assert exc.value.status.name == "RESOURCE_EXHAUSTED" and runner.admission_refusals == 1
    res = await runner.next_token_logprobs([SequenceQuery(a + [5], sequence_id="a")], 0)
    assert res[0].cached_tokens == len(a) and eng.kv_cache.stats().evictions == 0
    # A draft is admitted the same way (its prefix plus the drafted tokens).
    with pytest.raises(ResourceExhausted):
        from eft_serve.engine.types import DraftQuery

        await runner.draft([DraftQuery(c, 4, sequence_id="c")])
    # A query without a sequence id (the health probe, Score) is never held back.
    await runner.probe(5)


def test_row_layout_decodes_in_place_and_matches_gather_and_plain(model_dir, ref) -> None:
    rows = HFEngine.load(model_dir, name="rows", device=DEVICE, kv_cache_bytes=1 << 20, torch_threads=None)
    gather = HFEngine.load(
        model_dir, name="gather", device=DEVICE, kv_cache_bytes=1 << 20, torch_threads=None, attn_implementation="eager"
    )
    assert (rows.kv_layout, gather.kv_layout) == ("rows", "gather")
    assert rows.info.extra["kv_layout"] == "rows" and rows.info.extra["kv_cache_bytes"] == str(1 << 20)
    seqs = prompts(3, 4, n=20)
    for eng in (rows, gather):
        eng.next_token_logprobs([SequenceQuery(s, sequence_id=f"s{i}") for i, s in enumerate(seqs)], 1)
    ptrs = {i: rows.kv_cache._by_sequence[f"s{i}"].buf.data_ptr() for i in range(4)}
    copied = rows.kv_cache.stats().copied_tokens
    rng = np.random.default_rng(4)
    for _step in range(5):
        seqs = [s + [int(rng.integers(0, V - 1))] for s in seqs]
        qs = [SequenceQuery(s, sequence_id=f"s{i}") for i, s in enumerate(seqs)]
        before = rows.counters.forward_passes
        out_rows = rows.next_token_logprobs(qs, 0)
        out_gather = gather.next_token_logprobs(qs, 0)
        assert rows.counters.forward_passes - before == 1, "one batched forward a step"
        for s, r, g in zip(seqs, out_rows, out_gather):
            assert r.cached_tokens == g.cached_tokens == len(s) - 1
            want = full(ref, s)
            np.testing.assert_allclose(r.positions[0].full_logprobs, want, atol=TOL)
            np.testing.assert_allclose(g.positions[0].full_logprobs, want, atol=TOL)
    # Rows: no past gathered, no KV copied, every sequence still in the buffer it started in.
    assert rows.counters.gathered_tokens == 0 and rows.kv_cache.stats().copied_tokens == copied
    assert {i: rows.kv_cache._by_sequence[f"s{i}"].buf.data_ptr() for i in range(4)} == ptrs
    # The gather layout copies every row's past into the padded batch on every step.
    assert gather.counters.gathered_tokens >= 5 * sum(20 for _ in seqs)


def test_kv_budget_is_auto_by_default_and_explicit_is_honoured(model_dir) -> None:
    assert PoolConfig(model="demo:large_base").kv_cache_bytes is None
    auto = HFEngine.load(model_dir, name="auto", device=DEVICE, torch_threads=None)
    assert auto.kv_cache.max_bytes > 64 << 20  # a fifth of this host's available memory
    sized = HFEngine.load(model_dir, name="sized", device=DEVICE, torch_threads=None, memory_bytes=8 << 20)
    weights = sum(p.numel() * p.element_size() for p in sized.model.parameters())
    assert sized.kv_cache.max_bytes == ((8 << 20) - weights) // 2
    fixed = HFEngine.load(model_dir, name="fixed", device=DEVICE, torch_threads=None, kv_cache_bytes=12345)
    assert fixed.kv_cache.max_bytes == 12345


# --- chunked prefill: a long prompt is fed over several turns, exactly --------------------------


async def _decode(runner: EngineRunner, tokens: list[int], steps: int, sid: str) -> list[np.ndarray]:
    out = []
    for _ in range(steps):
        res = await runner.next_token_logprobs([SequenceQuery(list(tokens), sequence_id=sid)], 0)
        out.append(res[0].positions[0].full_logprobs)
        tokens.append(int(np.argmax(out[-1])))
    return out


async def test_chunked_prefill_feeds_a_long_prompt_over_turns_and_stays_exact(model_dir, ref) -> None:
    eng = HFEngine.load(model_dir, name="chunks", device=DEVICE, torch_threads=None)
    # The decoder comes back between turns; the companions wait (50 ms) lets it into each one.
    runner = EngineRunner(eng, "chunks", batching=CHUNKS_OF_16)
    short, long = prompts(5, 2, n=60)
    decoding = short[:10]
    await runner.next_token_logprobs([SequenceQuery(list(decoding), sequence_id="d")], 0)
    seen = list(decoding)
    steps = asyncio.ensure_future(_decode(runner, seen, 6, "d"))
    answer = await runner.next_token_logprobs([SequenceQuery(long, sequence_id="p")], 0)
    decoded = await steps
    # 60 positions in chunks of at most 16 beside the decoder: three chunks, then the call itself
    # feeds the rest.
    assert runner.turns.prefill_chunks == 3
    np.testing.assert_allclose(answer[0].positions[0].full_logprobs, full(ref, long), atol=TOL)
    for j, lp in enumerate(decoded):
        np.testing.assert_allclose(lp, full(ref, seen[: len(decoding) + j]), atol=TOL)


async def test_a_turn_without_decoders_runs_its_prefill_whole(model_dir, ref) -> None:
    runner = EngineRunner(
        HFEngine.load(model_dir, name="alone", device=DEVICE), "alone", batching=TurnPolicy(max_prefill_tokens=16)
    )
    long = prompts(7, 1, n=60)[0]
    (res,) = await runner.next_token_logprobs([SequenceQuery(long, sequence_id="p")], 0)
    assert runner.turns.prefill_chunks == 0  # nobody to protect: no chunking
    np.testing.assert_allclose(res.positions[0].full_logprobs, full(ref, long), atol=TOL)


async def _with_a_decoder(runner: EngineRunner, long: list[int]) -> list:
    """`long` prefilled while another sequence decodes (so its turns have a decoder to protect)."""
    seen = prompts(8, 1, n=10)[0]
    await runner.next_token_logprobs([SequenceQuery(list(seen), sequence_id="d")], 0)
    steps = asyncio.ensure_future(_decode(runner, seen, 6, "d"))
    answer = await runner.next_token_logprobs([SequenceQuery(long, sequence_id="p")], 0)
    await steps
    return answer


async def test_no_chunks_without_kept_kv_and_a_chunk_that_is_not_kept_runs_whole(model_dir, ref) -> None:
    long = prompts(6, 1, n=60)[0]
    off = EngineRunner(
        HFEngine.load(model_dir, name="off", device=DEVICE, kv_cache_bytes=0),
        "off",
        batching=CHUNKS_OF_16,
    )
    (res,) = await _with_a_decoder(off, long)
    assert off.turns.prefill_chunks == 0
    np.testing.assert_allclose(res.positions[0].full_logprobs, full(ref, long), atol=TOL)
    # A store of 20 positions, held by the decoder: the first 16-token chunk goes to a transient
    # buffer and makes no progress, so the call then runs whole instead of chunking forever (a
    # normal run takes 3 chunks, see above).
    eng = HFEngine.load(model_dir, name="tiny-kv", device=DEVICE, torch_threads=None)
    eng.kv_cache = SequenceKVStore(20 * 512, eng.kv_cache.geometry)
    runner = EngineRunner(eng, "tiny-kv", batching=CHUNKS_OF_16)
    (res,) = await _with_a_decoder(runner, long)
    assert runner.turns.prefill_chunks == 1
    np.testing.assert_allclose(res.positions[0].full_logprobs, full(ref, long), atol=TOL)
