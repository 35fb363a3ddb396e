"""`EftConfig`, the whole tree, and the rules that span its parts.

Owns the cross-references: every recipe role has a pool, the default recipe and the drafter
exist, LoRA links (`base_pool`, `colocate_with`) name a full-model pool. Knows nothing of loading
files or of the built-in demo stack (`config.loading`).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from eft_serve.cache.config import CacheConfig, LocalRedisConfig
from eft_serve.config.coordinator import CoordinatorConfig
from eft_serve.config.frontends import AuthConfig, GrpcConfig, HttpConfig, RayConfig, TlsConfig
from eft_serve.config.pool import PoolConfig
from eft_serve.config.recipe import RecipeConfig
from eft_serve.strict_model import StrictModel


def _check_lora_links(pools: dict[str, PoolConfig]) -> None:
    """`base_pool` / `colocate_with` name another pool that is a plain model (what a directory
    holds is checked at start-up, `eft_serve.adapters`)."""
    for role, pool in pools.items():
        for key in ("base_pool", "colocate_with"):
            other = getattr(pool, key)
            if other is None:
                continue
            if other == role or other not in pools:
                raise ValueError(f"pools.{role}.{key} {other!r} must name another pool: {sorted(set(pools) - {role})}")
            if pools[other].base_pool or pools[other].colocate_with:
                raise ValueError(
                    f"pools.{role}.{key} {other!r} is itself a LoRA adapter pool; an adapter's base is a full model"
                )
        if pool.colocate_with is None:
            continue  # a pool of its own: either engine (vLLM loads base + adapter merged on disk)
        # Co-located: either engine too (hf: peft mixed-adapter rows; vllm: a LoRARequest per query).
        if pool.base_pool not in (None, pool.colocate_with):
            raise ValueError(
                f"pools.{role}: colocate_with {pool.colocate_with!r} must be the adapter's base_pool "
                f"({pool.base_pool!r}); an adapter is served inside its base's pool"
            )


class EftConfig(StrictModel):
    """The whole tree: what `--config FILE` is validated against."""

    pools: dict[str, PoolConfig]
    """The model pools by role name; each is its own Serve application."""
    recipes: dict[str, RecipeConfig]
    """The merge formulas by name; every role they name needs a pool."""
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    """Request limits and defaults, retries, health probing, speculative decoding."""
    cache: CacheConfig = Field(default_factory=CacheConfig)
    """The next-token result cache (Redis or in-process)."""
    local_redis: LocalRedisConfig = Field(default_factory=LocalRedisConfig)
    """The Redis `eft serve` and `eft demo` start when no `cache.url` is set."""
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    """Serve's gRPC proxy (the client-facing API)."""
    http: HttpConfig = Field(default_factory=HttpConfig)
    """Serve's HTTP proxy (the OpenAI-compatible API)."""
    auth: AuthConfig = Field(default_factory=AuthConfig)
    """API keys."""
    tls: TlsConfig = Field(default_factory=TlsConfig)
    """The TLS front of a local `eft serve`."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """The Ray cluster to start or join."""

    @model_validator(mode="after")
    def _references(self) -> EftConfig:
        if not self.pools:
            raise ValueError("at least one pool is required")
        for name, recipe in self.recipes.items():
            missing = [r for r in recipe.roles() if r not in self.pools]
            if missing:
                raise ValueError(f"recipe {name!r} uses roles without a pool: {missing}; pools: {sorted(self.pools)}")
        if self.coordinator.default_recipe not in self.recipes:
            raise ValueError(
                f"coordinator.default_recipe {self.coordinator.default_recipe!r} is not a recipe: {sorted(self.recipes)}"
            )
        if self.coordinator.default_max_new_tokens > self.coordinator.max_new_tokens_cap:
            raise ValueError("coordinator.default_max_new_tokens exceeds max_new_tokens_cap")
        drafter = self.coordinator.speculative.drafter
        if drafter != "expert" and drafter not in self.pools:
            raise ValueError(
                f"coordinator.speculative.drafter {drafter!r} is neither 'expert' nor a pool: {sorted(self.pools)}"
            )
        _check_lora_links(self.pools)
        return self

    def deployed_pools(self) -> dict[str, PoolConfig]:
        """The pools with a deployment of their own (Serve application, replicas, pods): all but
        the co-located LoRA roles, whose adapter is served inside its base's pool (docs/lora.md)."""
        return {role: pool for role, pool in self.pools.items() if pool.colocate_with is None}

    def with_models(self, **paths: str | None) -> EftConfig:
        """Copy with some pools pointed at other model directories (CLI flags)."""
        data = self.model_dump()
        for role, path in paths.items():
            if path is None:
                continue
            if role not in data["pools"]:
                raise ValueError(f"no pool named {role!r}; pools: {sorted(data['pools'])}")
            data["pools"][role]["model"] = str(path)
        return EftConfig.model_validate(data)
