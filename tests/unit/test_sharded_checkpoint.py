"""Checkpoints as users bring them: sharded safetensors (`model.safetensors.index.json`) and
bf16/float16 weights, loaded through the engine factory on CPU; the weights fingerprint covers
every shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from eft_serve.engine.factory import load_engine
from eft_serve.engine.fingerprint import model_fingerprint
from eft_serve.engine.types import LogprobEngine, SequenceQuery

V = 300
# Largest |Δ logprob| against the float32 load: bf16 keeps 8 mantissa bits, float16 11.
TOLERANCE = {"float32": 1e-5, "float16": 0.02, "bfloat16": 0.15}
PROMPTS = [[5, 17, 42, 7, 99, 3], [250, 1, 2]]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(V - 1)} | {"<eos>": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="t0")


def _save(path: Path, stored_dtype: torch.dtype) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # peaked distributions: rounding differences are visible
        tie_word_embeddings=False,
        eos_token_id=V - 1,
        bos_token_id=V - 1,
    )
    model = LlamaForCausalLM(config).to(stored_dtype)
    # ~250 KB of float32 weights in shards of at most 64 KB.
    model.save_pretrained(path, max_shard_size="64KB", safe_serialization=True)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("sharded_fp32"), torch.float32)


def _shards(path: Path) -> list[str]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def _full_logprobs(engine: LogprobEngine) -> list[np.ndarray]:
    """Full-vocabulary logprobs of every prompt, then of one decode step on the kept KV."""
    out = []
    for i, p in enumerate(PROMPTS):
        out.append(
            engine.next_token_logprobs([SequenceQuery(p, sequence_id=f"s{i}")], logprob_top_k=0)[0]
            .positions[0]
            .full_logprobs
        )
        out.append(
            engine.next_token_logprobs([SequenceQuery([*p, 11], sequence_id=f"s{i}")], logprob_top_k=0)[0]
            .positions[0]
            .full_logprobs
        )
    return out


def _load(path: Path, dtype: str) -> LogprobEngine:
    return load_engine("hf", path, name=f"m-{dtype}", dtype=dtype, device="cpu", kv_cache_bytes=1 << 22)


def test_the_checkpoint_really_is_sharded(sharded: Path) -> None:
    assert len(_shards(sharded)) >= 3 and not (sharded / "model.safetensors").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_sharded_checkpoint_loads_in_each_dtype_close_to_float32(sharded: Path, dtype: str) -> None:
    reference = _full_logprobs(_load(sharded, "float32"))
    engine = _load(sharded, dtype)
    assert engine.info.dtype == dtype and engine.info.vocab_size == V
    assert engine.info.model_fingerprint == model_fingerprint(sharded)
    got = _full_logprobs(engine)
    for ref, lp in zip(reference, got):
        assert lp.shape == (V,) and np.isfinite(lp).all()
        assert abs(float(np.logaddexp.reduce(lp.astype(np.float64)))) < 1e-4  # normalised in float32
        assert float(np.abs(lp - ref).max()) < TOLERANCE[dtype]
    if dtype != "float32":  # the rounding is real: the half-precision weights were used
        assert max(float(np.abs(lp - ref).max()) for ref, lp in zip(reference, got)) > 1e-5


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_precision_weights_on_disk_load(tmp_path: Path, stored: torch.dtype) -> None:
    path = _save(tmp_path / "half", stored)
    name = str(stored).removeprefix("torch.")
    assert json.loads((path / "config.json").read_text())["dtype"] == name and len(_shards(path)) >= 2
    # Stored half, served as stored and upcast to float32: the same weights, so close answers.
    half, upcast = _full_logprobs(_load(path, name)), _full_logprobs(_load(path, "float32"))
    for a, b in zip(half, upcast):
        assert np.isfinite(a).all() and np.isfinite(b).all()
        assert float(np.abs(a - b).max()) < TOLERANCE[name]


def test_fingerprint_covers_every_shard(sharded: Path, tmp_path: Path) -> None:
    base = model_fingerprint(sharded)
    seen = {base}
    for shard in _shards(sharded):
        copy = tmp_path / shard.replace(".", "_")
        shutil.copytree(sharded, copy)
        data = bytearray((copy / shard).read_bytes())
        data[-1] ^= 0x01  # last byte: tensor data, past the safetensors header
        (copy / shard).write_bytes(bytes(data))
        seen.add(model_fingerprint(copy))
    # Every one-byte edit gave a digest of its own (and none equals the original's).
    assert len(seen) == 1 + len(_shards(sharded))
    # An unchanged copy elsewhere has the same weights, so the same fingerprint.
    same = tmp_path / "same"
    shutil.copytree(sharded, same)
    assert model_fingerprint(same) == base
