"""The whole local stack as one context manager: local Redis, Ray, the Serve apps — and teardown.

Owns lifecycle and order: build the demo family once in this process (so replicas do not race
to train it), start a local Redis when the cache wants Redis and none is configured, start or
join Ray, deploy, and on exit stop exactly what it started (Serve API, `ray.shutdown()`, the
Redis PID). Used by `eft serve`, `eft demo` and the benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from eft_serve.config import DEMO_SCHEME, EftConfig
from eft_serve.console import deferred_interrupts
from eft_serve.preflight import preflight


@contextlib.contextmanager
def local_stack(
    cfg: EftConfig, http_port: int | None = None, log: Callable[[str], None] = print
) -> Iterator[EftConfig]:
    """Run the stack for `cfg`; yields the effective config (with the local Redis URL filled in).

    `http_port` overrides `cfg.http.port` (Serve's HTTP proxy: the OpenAI-compatible API).
    """
    from eft_serve.infra.redis_server import LocalRedisServer
    from eft_serve.infra.tls_proxy import tls_front
    from eft_serve.serve.local import deploy_stack, start_local_ray, teardown

    preflight(cfg)  # the refusals that need no Ray: one line naming the pool (StartupError)
    if any(p.model.startswith(DEMO_SCHEME) for p in cfg.pools.values()):
        from eft_serve.demo.family import ensure_demo_family

        family = ensure_demo_family(log=log)
        log(f"demo family ready at {family.root}")
    if http_port is not None:  # the effective config says where the HTTP proxy is
        cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={"port": http_port})})
    redis: LocalRedisServer | None = None
    started_ray = False
    try:
        if cfg.cache.enabled and not cfg.cache.url and cfg.cache.backend != "memory" and cfg.local_redis.enabled:
            redis = LocalRedisServer(cfg.local_redis)
            redis.start()
            log(
                f"local Redis on {redis.url} (maxmemory {cfg.local_redis.maxmemory}, {cfg.local_redis.maxmemory_policy})"
            )
            cfg = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"url": redis.url})})
        started_ray = start_local_ray(cfg)
        deploy_stack(cfg, log=log)
        with tls_front(cfg, log) as cfg:  # nginx in front of the gRPC proxy when tls.enabled
            yield cfg
    finally:
        # A second Ctrl-C must not cut teardown short and leave half a stack running.
        with deferred_interrupts():
            with contextlib.suppress(Exception):
                teardown(started_ray)
            if redis is not None:
                redis.stop()
