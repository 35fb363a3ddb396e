"""The model-pool Serve deployment: one engine per replica, concurrent calls batched.

Owns replica start-up (engine load; the engine sets torch's thread count) and the Serve surface.
Concurrent `NextTokenLogprobs` calls to one replica share engine turns: the shared `EngineRunner`
coalesces every call waiting when the engine frees into its next call (up to `max_batch_size`),
so sequences from different requests share forward passes. Serve's `@serve.batch` is not used:
it closes batches on a timer, not when the engine frees (see `engine.turn_queue`). Messages
travel as serialized `eft.v1` protobuf bytes.
Each `NextTokenLogprobs` answer names the replica that served it (`replica_id`), so KV-affinity
routing can be observed. `check_health` (Serve's periodic replica check) runs a 1-token forward
under `health_check_timeout_s`, so a hung engine gets its replica restarted. Errors leave as `EftError`s; the caller maps them.
"""

from __future__ import annotations

import gc
from typing import Any

from ray import serve

from eft_serve.config import PoolConfig
from eft_serve.deadline import raise_if_expired
from eft_serve.engine.turn_queue import TurnPolicy
from eft_serve.proto_gen.eft.v1 import pool_pb2
from eft_serve.serve.metrics import PoolMetrics
from eft_serve.serve.names import POOL_DEPLOYMENT
from eft_serve.serve.replica_cpu import apply_replica_cpu_settings
from eft_serve.serve.startup_failure import marked
from eft_serve.transport.pool_rpc import PoolRpc


@serve.deployment(name=POOL_DEPLOYMENT)
class ModelPoolDeployment:
    def __init__(self, role: str, pool: dict[str, Any], lora: dict[str, Any] | None = None) -> None:
        from eft_serve.engine.factory import load_engine
        from eft_serve.model_paths import resolve_model_path

        cfg = PoolConfig.model_validate(pool)
        apply_replica_cpu_settings(cfg.replica, f"pool {role!r}")
        try:
            # LoRA (serve.app.pool_apps): an adapter pool loads its base and merges the adapter in;
            # a base pool with co-located adapters serves them beside its own rows.
            lora = lora or {}
            adapter = resolve_model_path(cfg.model) if lora.get("base_model") else None
            path = resolve_model_path(lora["base_model"]) if adapter is not None else resolve_model_path(cfg.model)
            adapters = {name: resolve_model_path(d) for name, d in (lora.get("adapters") or {}).items()}
            engine = load_engine(
                cfg.engine,
                path,
                name=f"{role}:{(adapter or path).name}",
                dtype=cfg.dtype,
                device=cfg.device,
                kv_cache_bytes=cfg.kv_cache_bytes,
                memory_bytes=cfg.replica.memory_bytes,
                torch_threads=cfg.torch_threads,
                vllm=cfg.vllm,
                trust_remote_code=cfg.trust_remote_code,
                merge_adapter=adapter,
                adapters=adapters,
            )
        except Exception as e:
            # One line naming this pool and the cause reaches `eft serve` (serve.startup_failure).
            raise marked(f"pool {role!r}", e) from e
        self.role = role
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        batching = TurnPolicy(
            max_calls=cfg.max_batch_size,
            wait_s=cfg.batch_wait_timeout_s,
            max_prefill_tokens=cfg.max_prefill_tokens_per_turn,
        )
        self._rpc = PoolRpc(engine, role, batching=batching)
        self._rpc.runner.queue_wait_observer = PoolMetrics(role).queue_wait
        self._health_check_timeout_s = cfg.health_check_timeout_s
        # The loaded model's object graph lives as long as the replica: out of full GC passes.
        gc.freeze()

    async def NextTokenLogprobs(self, request: bytes) -> bytes:  # noqa: N802 (mirrors the RPC)
        msg = pool_pb2.NextTokenLogprobsRequest.FromString(request)
        raise_if_expired(msg.deadline_unix_s, f"model pool {self.role!r} (queued)")
        reply = await self._rpc.next_token_logprobs(msg)
        reply.replica_id = self._replica_id
        return reply.SerializeToString()

    async def Draft(self, request: bytes) -> bytes:  # noqa: N802
        return (await self._rpc.draft(pool_pb2.DraftRequest.FromString(request))).SerializeToString()

    async def Info(self) -> bytes:  # noqa: N802
        return self._rpc.info().SerializeToString()

    async def check_health(self) -> None:
        # Serve calls this periodically: a 1-token forward through the engine queue; raising
        # (failure or timeout) makes Serve restart the replica.
        await self._rpc.check_health(self._health_check_timeout_s)
