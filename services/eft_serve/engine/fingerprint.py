"""Identity hashes of a model: its vocabulary and its weights.

Owns: ``vocab_fingerprint`` (pools that merge logprobs must index the same tokens by the same ids)
and ``model_fingerprint`` (result-cache keys must never mix different weights).
Does NOT know: how models are loaded or served; it reads a tokenizer object and files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["model_fingerprint", "vocab_fingerprint", "WEIGHT_SUFFIXES"]

# Files whose bytes define the weights. Index files (``*.index.json``) are covered by the shards
# they point to; hashing them too would make a re-sharded identical model look different.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CHUNK = 1 << 20


def vocab_fingerprint(tokenizer: Any) -> str:
    """sha256 over the sorted (token, id) pairs: the id-to-token map the merge indexes by.

    Accepts a transformers tokenizer or a raw ``tokenizers.Tokenizer`` (anything with
    ``get_vocab()``). Special-token roles (BOS/EOS/PAD...) are NOT part of it: a chat fine-tune
    and its base share every id but name different EOS tokens (Qwen2.5-Instruct's ``<|im_end|>``
    vs the base's ``<|endoftext|>``, Llama-3-Instruct's ``<|eot_id|>``), and merge perfectly well;
    each model's stop ids travel in `ModelInfo.stop_token_ids` instead.
    """
    try:
        vocab: dict[str, int] = tokenizer.get_vocab()
    except TypeError:  # tokenizers.Tokenizer.get_vocab(with_added_tokens=...) in old versions
        vocab = tokenizer.get_vocab(True)
    h = hashlib.sha256(b"eft-vocab-v2\n")
    # Sort by id then token: ids are what the engines exchange, tokens disambiguate duplicates.
    for token, idx in sorted(vocab.items(), key=lambda kv: (int(kv[1]), kv[0])):
        # JSON per pair: unambiguous for any token text (newlines, quotes, unicode).
        h.update(json.dumps([token, int(idx)], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


_cache_lock = threading.Lock()
# (model dir, (file name, mtime_ns, size) per weight file) -> digest
_model_cache: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def _weight_files(model_dir: Path) -> list[Path]:
    # Top level only: that is what from_pretrained reads (Llama repos also ship an ``original/``
    # checkpoint that would double the hashing time without identifying anything more).
    files = [
        p
        for p in model_dir.iterdir()
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and "training_args" not in p.name
    ]
    return sorted(files, key=lambda p: p.name)


def model_fingerprint(model_dir: Path | str) -> str:
    """sha256 over ``config.json`` and the weight files' bytes (streamed, never held in memory).

    Cached in-process by every hashed file's (path, mtime_ns, size), so reloading an unchanged
    directory is free while any rewritten shard invalidates the entry.
    """
    root = Path(model_dir).resolve()
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{root} has no config.json; is it a transformers model directory?")
    files = [config, *_weight_files(root)]
    if len(files) == 1:
        raise FileNotFoundError(f"{root} has no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    key_parts = []
    for p in files:
        st = os.stat(p)
        key_parts.append((p.relative_to(root).as_posix(), st.st_mtime_ns, st.st_size))
    key = (str(root), tuple(key_parts))
    with _cache_lock:
        hit = _model_cache.get(key)
    if hit is not None:
        return hit

    h = hashlib.sha256(b"eft-model-v1\n")
    for p, (rel, _mtime, size) in zip(files, key_parts):
        # Name and size framing: concatenations of different file splits never collide.
        h.update(f"{rel}\0{size}\0".encode())
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    digest = h.hexdigest()
    with _cache_lock:
        _model_cache[key] = digest
    return digest
