"""`Generator`s the runner sends requests through: a running service over gRPC, or an in-process
coordinator (the same decode loop without Ray/gRPC, for tests and quick offline checks).

Owns the transport side of one completion and which failures are transient. Knows nothing
about questions, conditions or scores.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import grpc

from eft_serve.evaluation.runner import TransientError

# Worth a retry: overload, a replica lost mid-request, a slow pool. Everything else is a bug or
# a bad request and aborts the run.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}


class GrpcGenerator:
    """Streams `Generate` from a running service; one channel, shared by the runner's threads."""

    def __init__(self, address: str, timeout_s: float = 300.0) -> None:
        from eft_serve.client import EftClient

        self._client = EftClient(address, timeout=timeout_s)

    def recipes(self) -> list[str]:
        return [r.name for r in self._client.list_recipes().recipes]

    def __call__(self, prompt: str, params: Mapping[str, Any]) -> str:
        try:
            return "".join(msg.text for msg in self._client.generate(prompt, **params))
        except grpc.RpcError as e:
            if e.code() in _TRANSIENT:
                raise TransientError(f"{e.code().name}: {e.details()}") from e
            raise

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GrpcGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CoordinatorGenerator:
    """Runs an `EftCoordinator` on its own event loop thread, callable from any thread."""

    def __init__(self, coordinator: Any) -> None:
        self._coordinator = coordinator
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="eft-eval-loop", daemon=True)
        self._thread.start()
        self._run(coordinator.start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def recipes(self) -> list[str]:
        return list(self._coordinator.recipe_table())

    def __call__(self, prompt: str, params: Mapping[str, Any]) -> str:
        from eft_serve.coordinator.request import GenerationRequest, MergeOptions

        merge_keys = ("recipe", "beta", "expert_weights", "conservative", "logprob_top_k")
        merge = MergeOptions(**{k: params[k] for k in merge_keys if k in params})
        sampling = {k: v for k, v in params.items() if k not in merge_keys}
        sampling["stop"] = tuple(sampling.get("stop", ()))
        req = GenerationRequest(prompt=prompt, merge=merge, **sampling)

        async def collect() -> str:
            stream = await self._coordinator.generate(req)
            return "".join([chunk.text async for chunk in stream])

        return self._run(collect())

    def close(self) -> None:
        self._run(self._coordinator.stop())  # its background pool probe
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> CoordinatorGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def demo_coordinator(family: Any, roles: tuple[str, ...] | None = None, max_new_tokens_cap: int = 256) -> Any:
    """An in-process `EftCoordinator` over the demo family's models (full family recipes)."""
    from transformers import AutoTokenizer

    from eft_serve.config import CoordinatorConfig, demo_config
    from eft_serve.coordinator.service import EftCoordinator
    from eft_serve.engine.hf_engine import HFEngine
    from eft_serve.transport.inprocess import InProcessPool

    cfg = demo_config(full_family=True)
    roles = roles or tuple(cfg.pools)
    recipes = {name: r for name, r in cfg.recipes.items() if set(r.roles()) <= set(roles)}
    pools = {r: InProcessPool(HFEngine.load(family.paths[r], name=r, device="cpu"), r) for r in roles}
    tokenizer = AutoTokenizer.from_pretrained(family.tokenizer_path)
    # Each model's own tokenizer: chat requests are rendered with its own chat template.
    tokenizers = {r: AutoTokenizer.from_pretrained(family.paths[r]) for r in roles}
    default = cfg.coordinator.default_recipe if cfg.coordinator.default_recipe in recipes else next(iter(recipes))
    return EftCoordinator(
        pools,
        recipes,
        tokenizer,
        CoordinatorConfig(max_new_tokens_cap=max_new_tokens_cap, default_recipe=default),
        tokenizers=tokenizers,
    )
