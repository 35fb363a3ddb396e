"""The one validated configuration tree (pydantic) for pools, recipes, coordinator, cache and Ray.

Owns the schema, its defaults (the built-in demo stack) and YAML loading (a file is an overlay
merged over the defaults, `config_overlay`). The Serve builder, the CLI and the Kubernetes
renderer all read an `EftConfig`; nothing else parses config files. Knows nothing about how the
config is executed. Unknown keys are errors everywhere (`extra="forbid"`), because Ray Serve
silently ignores unknown keys and a typo must not pass.

One module per topic, every name importable from here (`from eft_serve.config import X`):
`replica` (Serve replica options, autoscaling), `pool` (one model pool), `recipe` (merge formulas,
prompt formats), `coordinator` (request limits, pool calls, speculation), `frontends` (gRPC, HTTP,
auth, TLS, Ray), `tree` (`EftConfig` and its cross-references), `loading` (the demo stack, YAML).
"""

from eft_serve.config.coordinator import AccessLogConfig, CoordinatorConfig, SpeculativeConfig
from eft_serve.config.frontends import AuthConfig, GrpcConfig, HttpConfig, RayConfig, TlsConfig
from eft_serve.config.loading import DEMO_SCHEME, demo_config, load_config
from eft_serve.config.pool import PoolConfig
from eft_serve.config.recipe import PromptFormat, PromptTemplate, RecipeConfig
from eft_serve.config.replica import AutoscalingConfig, ReplicaConfig
from eft_serve.config.tree import EftConfig
from eft_serve.config_overlay import ConfigError

__all__ = [
    "DEMO_SCHEME",
    "AccessLogConfig",
    "AuthConfig",
    "AutoscalingConfig",
    "ConfigError",
    "CoordinatorConfig",
    "EftConfig",
    "GrpcConfig",
    "HttpConfig",
    "PoolConfig",
    "PromptFormat",
    "PromptTemplate",
    "RayConfig",
    "RecipeConfig",
    "ReplicaConfig",
    "SpeculativeConfig",
    "TlsConfig",
    "demo_config",
    "load_config",
]
