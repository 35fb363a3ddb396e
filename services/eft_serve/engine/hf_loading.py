"""Loading a local transformers checkpoint for the HF engine: weights, tokenizer, identity.

Owns reading a model directory (dtype, device, thread count, `trust_remote_code`, a LoRA adapter
merged in or co-located adapters attached, `engine.lora`) and describing what was loaded as a
`ModelInfo`: the merge support is the tokenizer's ids (`len(tokenizer)`; output heads padded
beyond it are cut off by the engine), the head's rows, the context limit, EOS, and the
vocabulary and weights fingerprints. Does NOT know KV layouts, batching or serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eft_serve.engine.fingerprint import model_fingerprint as hash_weights
from eft_serve.engine.fingerprint import vocab_fingerprint
from eft_serve.engine.kv_layout import kv_reuse_supported
from eft_serve.engine.logprob_view import tokenizer_support
from eft_serve.engine.lora import LoraSet, apply_lora
from eft_serve.engine.stop_tokens import model_stop_token_ids
from eft_serve.engine.types import ModelInfo

__all__ = ["DTYPES", "load_hf_model", "resolve_device", "resolve_dtype"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def resolve_device(device: str) -> torch.device:
    """``auto`` = first CUDA device when there is one, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def resolve_dtype(dtype: str) -> tuple[str, torch.dtype]:
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name, DTYPES[name]


def _max_context(config: Any) -> int | None:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_id(tokenizer: Any, config: Any) -> int:
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, int):
            return value
    return -1


def load_hf_model(
    model_dir: str | Path,
    *,
    name: str,
    dtype: str = "float32",
    device: str = "auto",
    torch_threads: int | None = 1,
    tokenizer_dir: str | Path | None = None,
    model_fingerprint: str | None = None,
    max_context: int | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: str | Path | None = None,
    adapters: Mapping[str, str | Path] | None = None,
) -> tuple[Any, ModelInfo, LoraSet | None, int]:
    """(model in eval mode on its device, its `ModelInfo`, co-located adapters or None, the
    number of ids its input embedding takes within the tokenizer's)."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a local transformers model directory (no config.json); download "
            f"it first, e.g. `hf download <repo> --local-dir {path}`"
        )
    if torch_threads is not None:
        # Process-wide: replicas run one engine per process, one thread each by default.
        torch.set_num_threads(int(torch_threads))
    dtype_name, torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # Only a pool that grants it runs a checkpoint's own code (`trust_remote_code`).
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    base_fingerprint = model_fingerprint or hash_weights(path)
    model, lora, fingerprint, adapter_fps = apply_lora(model, base_fingerprint, merge=merge_adapter, adapters=adapters)
    model.to(dev)  # type: ignore[arg-type]  # transformers' stubs type .to() as a dtype-only wrapper
    model.eval()  # type: ignore[no-untyped-call]
    tok_path = Path(tokenizer_dir) if tokenizer_dir is not None else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ValueError(
            f"could not load a tokenizer from {tok_path} (needed for the vocab fingerprint "
            f"and EOS id); pass tokenizer_dir=...: {exc}"
        ) from exc

    out_emb: Any = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    head_rows = int(out_emb.weight.shape[0]) if out_emb is not None else int(model.config.vocab_size)
    # The merge support is the tokenizer's ids: heads are often padded beyond it (Qwen2.5,
    # Pythia), and padded rows are never real tokens.
    vocab_size = tokenizer_support(len(tokenizer), head_rows, path)
    in_emb: Any = model.get_input_embeddings()
    input_vocab = int(in_emb.weight.shape[0]) if in_emb is not None else vocab_size
    ctx = max_context or _max_context(model.config)
    if ctx is None:
        raise ValueError(f"{path}: config names no max positions; pass max_context=...")
    info = ModelInfo(
        name=name,
        vocab_size=vocab_size,
        max_context=int(ctx),
        eos_token_id=_eos_id(tokenizer, model.config),
        vocab_fingerprint=vocab_fingerprint(tokenizer),
        model_fingerprint=fingerprint,
        dtype=dtype_name,
        device=str(dev),
        num_parameters=sum(p.numel() for p in model.parameters()),
        extra={
            "model_dir": str(path.resolve()),
            "attn_implementation": str(getattr(model.config, "_attn_implementation", "")),
            "kv_reuse": "1" if kv_reuse_supported(model) else "0",
            "head_rows": str(head_rows),
            **({"merged_adapter": str(Path(merge_adapter).resolve())} if merge_adapter is not None else {}),
        },
        adapters=adapter_fps,
        stop_token_ids=model_stop_token_ids(tokenizer, path),
    )
    return model, info, lora, min(input_vocab, vocab_size)
