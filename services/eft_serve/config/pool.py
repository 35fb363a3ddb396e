"""One model pool's configuration: its model, engine, KV budget, batching and replicas.

Owns the per-pool schema and the rules within one pool (a tensor-parallel replica's GPUs). Knows
nothing of other pools: links between pools (LoRA `base_pool`, `colocate_with`) are checked by
the whole tree (`config.tree`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from eft_serve.config.replica import ReplicaConfig, replica_with_defaults
from eft_serve.engine.vllm_config import VLLMConfig
from eft_serve.strict_model import StrictModel

# Replica options that differ from ReplicaConfig's own defaults here.
_REPLICA_DEFAULTS: dict[str, Any] = {"max_ongoing_requests": 64}


class PoolConfig(StrictModel):
    """One model pool: a model role served by its own Serve application."""

    model: str
    """Local Hugging Face model directory, or `demo:<role>` for the built-in demo family, or a PEFT
    LoRA adapter directory (`adapter_config.json` + weights) over another pool's model (docs/lora.md)."""
    base_pool: str | None = None
    """A LoRA adapter's base: the pool whose model it was trained on. null = found from the
    adapter's `base_model_name_or_path` (and checked against that pool's weights at start-up)."""
    colocate_with: str | None = None
    """Serve this LoRA adapter inside that pool (its base's): one forward runs the base's rows and
    the adapter's together, so the role costs no pool call, deployment or weights of its own. null
    = a pool of its own that loads base + adapter. A co-located pool's other settings are unused."""
    trust_remote_code: bool = False
    """Run the Python code a checkpoint ships (`auto_map` in its config.json) when loading it.
    Off: such a checkpoint is refused at start-up, naming the pool; turn it on only for code you trust."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights' dtype."""
    device: str = "auto"
    """`auto` (the GPU when the replica has one, else CPU), `cpu` or `cuda[:N]`."""
    kv_cache_bytes: int | None = Field(None, ge=0)
    """Per-replica KV budget in bytes (0 = keep no KV). null = sized from memory when the replica
    loads: half of (replica.memory_bytes − weights) when memory_bytes is set, else half of the
    GPU's free memory, else a fifth of the host's available memory (engine/kv_budget.py).
    Sequences that do not fit wait for room (then RESOURCE_EXHAUSTED); running ones are never evicted."""
    torch_threads: int = Field(1, ge=1)
    """torch intra-op threads per replica (more than one collapses under CPU contention)."""
    max_batch_size: int = Field(32, ge=1)
    """Pool calls waiting when the engine frees are coalesced into its next call, up to this many
    (continuous batching, engine/turn_queue.py); engines that schedule calls themselves (vLLM)
    get them all at once instead."""
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    """Longest a turn waits for the sequences the pool expects back (those that called every
    step lately), so streams decoding together share turns; a lone stream never waits."""
    max_prefill_tokens_per_turn: int | None = Field(256, ge=16)
    """Chunked prefill: prompt positions an engine turn with decoding streams in it feeds beyond
    their rows; a longer prefill is split over turns so running streams keep stepping
    (null: whole prefills). vLLM chunks with its own scheduler instead."""
    kv_affinity: bool = True
    """Send every call of one sequence to the same replica (its KV cache), least loaded when it is
    full; off = Serve's default router (power of two choices)."""
    health_check_timeout_s: float = Field(10.0, gt=0)
    """Serve's periodic replica health check runs a 1-token forward (queued fairly with requests);
    slower than this, or failing, and Serve restarts the replica."""
    replica: ReplicaConfig = Field(default_factory=lambda: ReplicaConfig(**_REPLICA_DEFAULTS))
    """Serve replica options of this pool; its 64 calls in flight per replica are at least
    max_batch_size, or the router holds back batch-mates."""
    engine: Literal["hf", "vllm"] = "hf"
    """"hf": the transformers reference engine (exact, portable); "vllm": vLLM (paged KV, continuous
    batching, prefix caching, tensor parallelism), options under `vllm`."""
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    """vLLM engine options (used when `engine: vllm`)."""

    @field_validator("replica", mode="before")
    @classmethod
    def _replica_keys_over_these_defaults(cls, value: Any) -> Any:
        return replica_with_defaults(value, _REPLICA_DEFAULTS)

    @model_validator(mode="after")
    def _tensor_parallel_gpus(self) -> PoolConfig:
        # A tensor-parallel replica holds one GPU per shard: num_gpus is what Ray reserves for
        # it (as a placement group, see serve/tensor_parallel.py) and what k8s sizes pods by.
        # Left at 0 it is derived from the TP size; any other value must agree with it.
        tp = self.vllm.tensor_parallel_size
        if self.engine == "vllm" and tp > 1:
            if self.replica.num_gpus == 0:
                self.replica.num_gpus = float(tp)
            elif self.replica.num_gpus != tp:
                raise ValueError(
                    f"vllm.tensor_parallel_size is {tp}: replica.num_gpus must be {tp} (one GPU per shard; "
                    f"leave it out to derive it), got {self.replica.num_gpus:g}"
                )
        return self
