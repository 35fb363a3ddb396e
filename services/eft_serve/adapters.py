"""LoRA adapter pools and their bases: which pool's model each adapter was trained on.

Owns linking every pool whose model is a PEFT LoRA adapter directory to its base pool — named
by `base_pool` / `colocate_with`, or found from the adapter's `base_model_name_or_path` — and the
start-up check that the base pool really serves those weights (the weights fingerprints, when
`base_model_name_or_path` is a local model directory; the engine's load checks the shapes in any
case). Errors name the pool, both models and what to change. Also says where an adapter role's
tokenizer lives (its own directory when it ships one, else its base's).

Does NOT know how adapters are loaded (`engine.lora`) or deployed (`serve.app`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eft_serve.config import DEMO_SCHEME, EftConfig
from eft_serve.engine.fingerprint import model_fingerprint
from eft_serve.engine.lora import adapter_base_name, is_adapter_dir
from eft_serve.errors import FailedPrecondition, InvalidArgument
from eft_serve.model_paths import resolve_model_path

__all__ = ["LoraLink", "lora_links", "tokenizer_dir"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class LoraLink:
    """One adapter pool: its adapter directory, its base pool, and whether it is co-located there."""

    role: str
    adapter_dir: Path
    base_role: str
    colocated: bool


def _is_adapter(spec: str) -> bool:
    return not spec.startswith(DEMO_SCHEME) and is_adapter_dir(Path(spec).expanduser())


def lora_links(cfg: EftConfig, check_files: bool = True) -> dict[str, LoraLink]:
    """Every adapter pool's link to its base pool. With `check_files` (start-up), a pool that sets
    `base_pool` / `colocate_with` must hold an adapter and its base is checked against the base
    pool's weights; without (rendering elsewhere), the config's word is taken where files are absent."""
    links: dict[str, LoraLink] = {}
    for role, pool in cfg.pools.items():
        explicit = pool.colocate_with or pool.base_pool
        if not _is_adapter(pool.model):
            if explicit and (check_files or Path(pool.model).expanduser().exists()):
                key = "colocate_with" if pool.colocate_with else "base_pool"
                raise InvalidArgument(
                    f"pools.{role}.model {pool.model!r} is not a PEFT LoRA adapter directory (no adapter_config.json), "
                    f"but pools.{role}.{key} is set; drop it, or point model at the adapter"
                )
            if not explicit:
                continue
        adapter_dir = Path(pool.model).expanduser()
        base = explicit or _find_base(cfg, role, adapter_dir)
        if check_files:
            _check_base(cfg, role, adapter_dir, base)
        links[role] = LoraLink(role, adapter_dir, base, pool.colocate_with is not None)
    return links


def _local_model(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path if name and (path / "config.json").is_file() else None


def _find_base(cfg: EftConfig, role: str, adapter_dir: Path) -> str:
    name = adapter_base_name(adapter_dir)
    candidates = [r for r, p in cfg.pools.items() if r != role and not _is_adapter(p.model) and not p.base_pool]
    hint = f"set pools.{role}.base_pool to the pool serving its base ({', '.join(sorted(candidates))})"
    if not name:
        raise InvalidArgument(
            f"pools.{role}: LoRA adapter {str(adapter_dir)!r} names no base_model_name_or_path; {hint}"
        )
    local = _local_model(name)
    if local is not None:
        # The same directory, else the same weights anywhere (a copy of the base).
        for r in candidates:
            if resolve_model_path(cfg.pools[r].model).resolve() == local.resolve():
                return r
        fingerprint = model_fingerprint(local)
        for r in candidates:
            if model_fingerprint(resolve_model_path(cfg.pools[r].model)) == fingerprint:
                return r
        raise FailedPrecondition(
            f"pools.{role}: LoRA adapter {str(adapter_dir)!r} was trained on {name!r}, whose weights no pool "
            f"serves ({fingerprint[:12]}); add a pool for that base, or {hint}"
        )
    # A hub id ("org/model"): a pool whose directory carries that name.
    tail = name.rstrip("/").split("/")[-1]
    named = [r for r in candidates if _names_model(resolve_model_path(cfg.pools[r].model), name, tail)]
    if len(named) == 1:
        return named[0]
    raise InvalidArgument(
        f"pools.{role}: LoRA adapter {str(adapter_dir)!r} was trained on {name!r}, which "
        f"{'several pools' if named else 'no pool'} serve{'' if named else 's'} by that name; {hint}"
    )


def _names_model(model_dir: Path, name: str, tail: str) -> bool:
    if model_dir.name == tail:
        return True
    try:
        recorded = json.loads((model_dir / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError):
        return False
    return bool(recorded) and recorded in (name, tail)


def _check_base(cfg: EftConfig, role: str, adapter_dir: Path, base_role: str) -> None:
    """FailedPrecondition unless the base pool serves the weights the adapter names (when it names a
    local model directory; a hub id is checked by shapes when the engine loads the adapter)."""
    if not is_adapter_dir(adapter_dir):
        raise InvalidArgument(f"pools.{role}.model {str(adapter_dir)!r} is not a PEFT LoRA adapter directory")
    base_spec = cfg.pools[base_role].model
    if _is_adapter(base_spec):
        raise InvalidArgument(f"pools.{role}: its base pool {base_role!r} is itself a LoRA adapter")
    local = _local_model(adapter_base_name(adapter_dir))
    if local is None:
        return
    base_dir = resolve_model_path(base_spec)
    if local.resolve() == base_dir.resolve():
        return
    want, have = model_fingerprint(local), model_fingerprint(base_dir)
    if want != have:
        raise FailedPrecondition(
            f"pools.{role}: LoRA adapter {str(adapter_dir)!r} was trained on {str(local)!r} (weights {want[:12]}), "
            f"but its base pool {base_role!r} serves {str(base_dir)!r} (weights {have[:12]}); serve the adapter "
            f"over the pool of the model it was trained on"
        )


def tokenizer_dir(cfg: EftConfig, role: str, links: dict[str, LoraLink]) -> Path:
    """Where `role`'s tokenizer is: its model directory, or for an adapter without tokenizer files
    its base's."""
    path = resolve_model_path(cfg.pools[role].model)
    link = links.get(role)
    if link is None or any((path / f).is_file() for f in _TOKENIZER_FILES):
        return path
    return resolve_model_path(cfg.pools[link.base_role].model)
