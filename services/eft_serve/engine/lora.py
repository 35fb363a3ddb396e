"""PEFT LoRA adapters in the HF engine: a fine-tune merged into its base, or several served beside it.

Owns: recognising an adapter directory (``adapter_config.json`` + adapter weights) and the base it
names, the adapter's weights fingerprint (over the base's fingerprint and the adapter's files, so
result-cache keys never mix an adapter with its base or with another adapter), and loading:

* ``merge_adapter``: a pool of its own for the fine-tune (the default): base + adapter, merged
  into plain weights once (``merge_and_unload``), then served like any model;
* ``LoraSet.attach``: co-located roles: the adapters are injected into the base's pool model and
  every forward runs mixed rows — peft's mixed-adapter batches, each row naming its adapter
  (``"__base__"`` for the plain base) — so one forward answers the base and its fine-tunes.

A base that does not fit an adapter (other shapes, missing target modules) fails the load with a
``ValueError`` naming both directories. Does NOT know pools, roles, configs or the wire: adapters
are names and directories here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

__all__ = [
    "ADAPTER_CONFIG",
    "BASE_ROW",
    "LoraSet",
    "adapter_base_name",
    "adapter_fingerprint",
    "adapter_rank",
    "check_adapter_names",
    "is_adapter_dir",
    "merge_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
# peft's name for rows that run the plain base in a mixed-adapter batch.
BASE_ROW = "__base__"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_CHUNK = 1 << 20
M = TypeVar("M")


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG} must hold a JSON object")
    peft_type = str(data.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{adapter_dir} is a {peft_type} adapter; only LoRA adapters are served")
    return data


def adapter_base_name(adapter_dir: str | Path) -> str:
    """The adapter's ``base_model_name_or_path`` ("" when it names none)."""
    value = _adapter_config(Path(adapter_dir)).get("base_model_name_or_path")
    return value if isinstance(value, str) else ""


def adapter_rank(adapter_dir: str | Path) -> int:
    """The adapter's largest LoRA rank (``r``, or a larger one in ``rank_pattern``)."""
    data = _adapter_config(Path(adapter_dir))
    ranks = [data.get("r", 8), *(data.get("rank_pattern") or {}).values()]
    try:
        return max(int(r) for r in ranks)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{Path(adapter_dir) / ADAPTER_CONFIG} has a non-integer rank: {ranks}") from e


def check_adapter_names(names: Sequence[str]) -> None:
    """Co-located adapter names: non-empty, not peft's base-row name, no dots (ValueError)."""
    bad = [n for n in names if not n or n == BASE_ROW or "." in n]
    if bad:
        raise ValueError(f"adapter names must be non-empty, not {BASE_ROW!r} and without dots: {bad}")


def _weights_file(adapter_dir: Path) -> Path:
    for name in _ADAPTER_WEIGHTS:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise FileNotFoundError(f"{adapter_dir} has no adapter weights ({' or '.join(_ADAPTER_WEIGHTS)})")


def adapter_fingerprint(base_fingerprint: str, adapter_dir: str | Path) -> str:
    """sha256 over the base's fingerprint, the adapter's config and its weights: the identity of
    base + adapter (the same whether it is served merged or co-located)."""
    root = Path(adapter_dir)
    h = hashlib.sha256(b"eft-lora-v1\n")
    h.update(base_fingerprint.encode() + b"\0")
    for p in (root / ADAPTER_CONFIG, _weights_file(root)):
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _load_peft(model: Any, adapter_dir: Path, name: str, peft_model: Any | None = None) -> Any:
    """``model`` with adapter ``name`` from ``adapter_dir`` injected (into ``peft_model`` if given)."""
    from peft import PeftModel

    _adapter_config(adapter_dir)  # a readable LoRA config, or a clear error
    _weights_file(adapter_dir)
    base = getattr(model.config, "_name_or_path", "") or "the base model"
    try:
        if peft_model is None:
            return PeftModel.from_pretrained(model, adapter_dir, adapter_name=name, is_trainable=False)
        peft_model.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
        return peft_model
    except (RuntimeError, ValueError, KeyError) as e:
        # Size mismatches and missing target modules: the adapter was trained on another base.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"LoRA adapter {str(adapter_dir)!r} does not fit the base model {base!r} (was it trained on "
            f"another base?): {first}"
        ) from e


def merge_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """``model`` (a transformers causal LM) with the adapter merged into its weights."""
    merged = _load_peft(model, Path(adapter_dir), "default").merge_and_unload()
    merged.eval()
    return merged


class LoraSet:
    """Adapters injected into one base model, each row of a forward choosing its own.

    Every LoRA layer gets a forward pre-hook that hands peft the rows' adapter names (set per
    forward by ``rows``; all ``"__base__"`` otherwise), so a forward outside ``rows`` — a probe, a
    health check — runs the plain base, never an active adapter.
    """

    def __init__(self, peft_model: Any, names: Sequence[str]) -> None:
        self._peft = peft_model  # keeps the adapters' modules referenced
        self.names = tuple(names)
        self._local = threading.local()
        self._hooks: list[Any] = []
        from peft.tuners.lora import LoraLayer

        for module in peft_model.get_base_model().modules():
            if isinstance(module, LoraLayer):
                layer = cast(torch.nn.Module, module)  # a LoRA layer is an nn.Module (peft types it as a mixin)
                self._hooks.append(layer.register_forward_pre_hook(self._inject, with_kwargs=True))

    @classmethod
    def attach(cls, model: Any, adapters: Mapping[str, str | Path]) -> tuple[Any, LoraSet]:
        """Inject ``adapters`` (name -> directory) into ``model``: the model to run, and the set."""
        if not adapters:
            raise ValueError("LoraSet.attach needs at least one adapter")
        check_adapter_names(list(adapters))
        peft_model = None
        for name, path in adapters.items():
            peft_model = _load_peft(model, Path(path), name, peft_model)
        assert peft_model is not None
        peft_model.eval()
        return peft_model.get_base_model(), cls(peft_model, list(adapters))

    def _inject(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        names = getattr(self._local, "rows", None)
        if names is None:
            x: Any = args[0] if args else kwargs["x"]
            names = [BASE_ROW] * int(x.shape[0])
        kwargs["adapter_names"] = names
        return args, kwargs

    def check(self, adapter: str) -> None:
        if adapter and adapter not in self.names:
            raise ValueError(f"unknown adapter {adapter!r}; this pool serves {sorted(self.names)}")

    @contextlib.contextmanager
    def rows(self, adapters: Sequence[str]) -> Iterator[None]:
        """Within: row ``i`` of each forward runs adapter ``adapters[i]`` ("" = the plain base)."""
        self._local.rows = [a or BASE_ROW for a in adapters]
        try:
            yield
        finally:
            self._local.rows = None


def apply_lora(
    model: M,
    base_fingerprint: str,
    *,
    merge: str | Path | None = None,
    adapters: Mapping[str, str | Path] | None = None,
) -> tuple[M, LoraSet | None, str, dict[str, str]]:
    """The engine's view of ``model`` with LoRA: (model to run, co-located set or None, the pool's
    weights fingerprint, each co-located adapter's fingerprint). ``merge``: an adapter merged in
    (a pool of its own; the pool then names base + adapter); ``adapters``: co-located ones."""
    if merge is not None and adapters:
        raise ValueError("a pool either merges one adapter or co-locates adapters, not both")
    if merge is not None:
        merged = cast(M, merge_adapter(model, merge))  # the same model class, adapter merged in
        return merged, None, adapter_fingerprint(base_fingerprint, merge), {}
    if not adapters:
        return model, None, base_fingerprint, {}
    injected, lora = LoraSet.attach(model, adapters)
    return (
        cast(M, injected),
        lora,
        base_fingerprint,
        {n: adapter_fingerprint(base_fingerprint, p) for n, p in adapters.items()},
    )
