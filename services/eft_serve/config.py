"""The one validated configuration tree (pydantic) for pools, recipes, coordinator, cache and Ray.

Owns the schema, its defaults (the built-in demo stack) and YAML loading (a file is an overlay
merged over the defaults, `config_overlay`). The Serve builder, the
CLI and the Kubernetes renderer all read an `EftConfig`; nothing else parses config files.
Knows nothing about how the config is executed. Unknown keys are errors everywhere
(`extra="forbid"`), because Ray Serve silently ignores unknown keys and a typo must not pass.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from eft_serve.cache.config import CacheConfig, LocalRedisConfig
from eft_serve.config_overlay import ConfigError, describe_validation_error, merge_overlay, split_replace
from eft_serve.core.chat_format import compile_template
from eft_serve.demo.world import QA_TEMPLATE
from eft_serve.engine.vllm_config import VLLMConfig
from eft_serve.strict_model import StrictModel

DEMO_SCHEME = "demo:"


class AutoscalingConfig(StrictModel):
    """Serve autoscaling of one deployment: replicas follow the requests in flight."""

    min_replicas: int = Field(1, ge=0)
    """Fewest replicas Serve keeps (0 lets an idle deployment scale to zero)."""
    max_replicas: int = Field(1, ge=1)
    """Most replicas Serve may start."""
    initial_replicas: int | None = Field(None, ge=0)
    """Replicas at deploy time; null = min_replicas."""
    target_ongoing_requests: float = Field(2.0, gt=0)
    """Requests in flight per replica Serve aims for; below max_ongoing_requests, or it never scales."""
    upscale_delay_s: float = Field(5.0, ge=0)
    """How long demand must stay above target before Serve adds replicas."""
    downscale_delay_s: float = Field(30.0, ge=0)
    """How long demand must stay below target before Serve removes replicas."""
    metrics_interval_s: float = Field(1.0, gt=0)
    """How often replicas report their load to the autoscaler."""
    look_back_period_s: float = Field(5.0, gt=0)
    """Window over which the autoscaler averages the reported load."""

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ReplicaConfig(StrictModel):
    """Ray Serve replica options for one deployment (a pool or the coordinator)."""

    num_replicas: int = Field(1, ge=1, description="fixed replica count when autoscaling is off")
    autoscaling: AutoscalingConfig | None = None
    """Serve autoscaling; null = a fixed `num_replicas`."""
    max_ongoing_requests: int = Field(16, ge=1)
    """Calls one replica takes at once; more wait in Serve's queue."""
    max_queued_requests: int = Field(128, ge=-1)
    """Beyond this many queued requests the caller gets RESOURCE_EXHAUSTED instead of waiting."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs Ray reserves per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves per replica (a tensor-parallel vLLM pool: one per shard)."""
    memory_bytes: int | None = Field(None, ge=0)
    """Memory Ray reserves per replica; also the base of the automatic KV budget."""
    node_group_resource: str | None = None
    """Custom resource that only this pool's node group offers (placement on its own nodes)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Further custom Ray resources per replica."""
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0)
    """How long a stopping replica may finish its calls."""
    health_check_period_s: float = Field(5.0, gt=0)
    """How often Serve runs the replica's health check."""
    cpu_affinity: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    """Linux CPU ids every thread of each replica runs on (None: wherever the OS schedules). For
    CPU hosts that run several deployments: give the large base cores of its own (infra.cpu_affinity)."""

    @field_validator("cpu_affinity")
    @classmethod
    def _distinct_cpus(cls, cpus: list[int] | None) -> list[int] | None:
        if cpus is not None and len(set(cpus)) != len(cpus):
            raise ValueError(f"cpu_affinity {cpus} names a CPU twice")
        return cpus

    @model_validator(mode="after")
    def _scaling_is_possible(self) -> ReplicaConfig:
        # Serve never scales a deployment whose target is not below the per-replica cap.
        if self.autoscaling and self.autoscaling.target_ongoing_requests >= self.max_ongoing_requests:
            raise ValueError(
                f"autoscaling.target_ongoing_requests ({self.autoscaling.target_ongoing_requests}) must be "
                f"below max_ongoing_requests ({self.max_ongoing_requests}) or the deployment never scales"
            )
        return self

    def ray_actor_options(self) -> dict[str, Any]:
        resources = dict(self.resources)
        if self.node_group_resource:
            # A tiny amount: it pins placement without limiting replicas per node.
            resources.setdefault(self.node_group_resource, 0.001)
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if resources:
            options["resources"] = resources
        if self.memory_bytes:
            options["memory"] = self.memory_bytes
        return options

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.ray_actor_options(),
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
        }
        if self.autoscaling:
            a = self.autoscaling
            options["autoscaling_config"] = {
                "min_replicas": a.min_replicas,
                "max_replicas": a.max_replicas,
                "initial_replicas": a.initial_replicas,
                "target_ongoing_requests": a.target_ongoing_requests,
                "upscale_delay_s": a.upscale_delay_s,
                "downscale_delay_s": a.downscale_delay_s,
                "metrics_interval_s": a.metrics_interval_s,
                "look_back_period_s": a.look_back_period_s,
            }
        else:
            options["num_replicas"] = self.num_replicas
        return options


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
    replica: ReplicaConfig = Field(default_factory=lambda: ReplicaConfig(max_ongoing_requests=64))
    """Serve replica options of this pool; its 64 calls in flight per replica are at least
    max_batch_size, or the router holds back batch-mates."""
    engine: Literal["hf", "vllm"] = "hf"
    """"hf": the transformers reference engine (exact, portable); "vllm": vLLM (paged KV, continuous
    batching, prefix caching, tensor parallelism), options under `vllm`."""
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    """vLLM engine options (used when `engine: vllm`)."""

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


class PromptTemplate(StrictModel):
    """A Jinja prompt template for chat requests (variables: see `eft_serve.core.chat_format`)."""

    template: str
    """Jinja template (variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`); it places its own special tokens."""

    @model_validator(mode="after")
    def _compiles(self) -> PromptTemplate:
        compile_template(self.template)  # ValueError naming the problem: fail at config load
        return self


# How one model of a recipe sees a chat request: "own" (its tokenizer's chat template, else the
# plain transcript), "plain" (the transcript "System: …\nUser: …\nAssistant:") or a template.
PromptFormat = Literal["own", "plain"] | PromptTemplate


class RecipeConfig(StrictModel):
    """score = log p_base + Σ_j w_j · (log p_expert_j − log p_reference), renormalised per token."""

    description: str = ""
    """One line shown by `eft recipes` and `ListRecipes`."""
    base: str
    """The pool whose logprobs the recipe starts from (the large base in up-scaling)."""
    experts: list[str] = Field(default_factory=list)
    """Pools whose difference to `reference` is added, each times its weight and β."""
    reference: str | None = None
    """The pool the experts are compared with (the small base in up-scaling)."""
    default_weights: dict[str, float] = Field(default_factory=dict)
    """Default expert weights before the per-request β scaling; experts not named default to 1."""
    prompt_format: dict[str, PromptFormat] = Field(default_factory=dict)
    """Chat requests only: the prompt format per role of the recipe; roles not named get "own"."""

    @model_validator(mode="after")
    def _shape(self) -> RecipeConfig:
        if self.experts and not self.reference:
            raise ValueError("a recipe with experts needs a reference model")
        if not self.experts and self.reference:
            raise ValueError("a reference without experts has no effect; drop it")
        unknown = set(self.default_weights) - set(self.experts)
        if unknown:
            raise ValueError(f"default_weights names non-experts: {sorted(unknown)}")
        for name, w in self.default_weights.items():
            if not math.isfinite(w):
                raise ValueError(f"default weight of {name} is not finite")
        strangers = set(self.prompt_format) - set(self.roles())
        if strangers:
            raise ValueError(f"prompt_format names roles outside the recipe: {sorted(strangers)}")
        return self

    def roles(self) -> list[str]:
        return [self.base, *self.experts, *([self.reference] if self.reference else [])]


class SpeculativeConfig(StrictModel):
    """Speculative decoding (paper §4.3): a small model drafts a block, every pool scores it once."""

    enabled: bool = False
    """Server default for requests that do not say; a request may turn it on or off."""
    max_draft_tokens: int = Field(8, ge=1, le=64)
    """Most tokens drafted per block (a request may ask for fewer, never more)."""
    adaptive: bool = True
    """Grow the block after a fully accepted one, shrink it after an early rejection."""
    drafter: str = "expert"
    """Who drafts: "expert" = the recipe's first expert with a non-zero weight (the small
    fine-tuned model in up-scaling), or a pool role name."""
    acceptance: Literal["coupled", "rejection"] = "coupled"
    """"coupled": a drafted token is kept iff the token plain decoding would choose at that
    position (same seed) equals it, so output is identical to non-speculative decoding;
    "rejection": standard speculative rejection sampling (same distribution, not same text)."""


class AccessLogConfig(StrictModel):
    """One JSON line per request from the coordinator (logger `eft_serve.access`, docs/operations.md#logs)."""

    enabled: bool = True
    """Write one JSON line per request."""
    include_prompt: bool = False
    """Prompt text is user data: off unless an operator turns it on."""


class CoordinatorConfig(StrictModel):
    """The coordinator: request defaults and limits, pool calls, health probing."""

    default_recipe: str = "upscale"
    """Recipe of requests that name none."""
    default_logprob_top_k: int = Field(20, ge=0)
    """Per-model top-k used for merging when a request does not say; 0 = exact full vocabulary."""
    max_logprob_top_k: int = Field(1024, ge=1)
    """Largest per-model top-k a request may ask for."""
    max_top_logprobs: int = Field(20, ge=0)
    """Most alternatives a request may ask for per generated token (`top_logprobs`)."""
    default_max_new_tokens: int = Field(64, ge=1)
    """Tokens generated when a request does not say."""
    max_new_tokens_cap: int = Field(512, ge=1)
    """Most tokens a request may ask for (INVALID_ARGUMENT above)."""
    max_stop_strings: int = Field(16, ge=0)
    """Most stop strings per request."""
    max_stop_string_chars: int = Field(256, ge=1)
    """Longest stop string in characters (each is matched against the text of every new token)."""
    max_prompt_bytes: int = Field(256 * 1024, ge=1)
    """A prompt longer than this many UTF-8 bytes is refused before it is tokenized."""
    max_score_continuation_tokens: int = Field(512, ge=1)
    """Most tokens a Score continuation may have (each is one scored position in every pool)."""
    tokenizer_workers: int = Field(1, ge=0)
    """Threads that tokenize prompts and render chats off the event loop (anything over ~1 KiB of
    text), so a long prompt never stalls the replica's other streams (docs/latency-isolation.md).
    One serialises encodes on a tokenizer (as vLLM does); 0 = on the event loop (benchmarks only)."""
    tokenizer_backlog_chars: int = Field(2 * 1024 * 1024, ge=1)
    """Characters of prompt text a replica may have waiting for or in tokenization (about 8
    maximum-size prompts, ~1.5 s of one thread); a request beyond it is refused RESOURCE_EXHAUSTED."""
    merge_workers: int = Field(2, ge=0)
    """Threads that merge and sample full-vocabulary steps (exact mode over a real vocabulary:
    milliseconds a token) off the event loop; top-k steps stay on it. 0 = on the event loop."""
    allow_exact_mode: bool = True
    """Exact mode (logprob_top_k = 0: full-vocabulary logprobs from every pool) is costly; off
    refuses it with PERMISSION_DENIED for every caller (API keys can refuse it per key too)."""
    default_timeout_s: float = Field(120.0, gt=0)
    """Deadline of a request that sets no `timeout_s` (queue time included)."""
    max_timeout_s: float = Field(600.0, gt=0)
    """The largest timeout_s a request may ask for (INVALID_ARGUMENT above); the gRPC proxy's
    request timeout defaults to this plus a margin (`grpc.request_timeout_s`)."""
    pool_call_timeout_s: float = Field(30.0, gt=0)
    """One pool call slower than this is reported UNAVAILABLE instead of hanging the stream."""
    pool_call_retries: int = Field(2, ge=0)
    """The wire is stateless, so a failed pool call is retried (another replica may serve it)
    while the request's deadline allows; a lost replica costs a recompute, not a request."""
    pool_call_retry_budget: float = Field(0.1, ge=0, le=1)
    """Retries (connection-level failures only) may add at most this fraction of the pool calls
    made (plus a small reserve), so an outage is not multiplied into a retry storm."""
    coalesce_pool_calls: bool = True
    """Concurrent streams' pool calls of one event-loop turn leave as one call per pool replica
    (coordinator.call_coalescer): far fewer Serve calls at the same KV affinity."""
    conservative_top_p: float = Field(0.9, gt=0, le=1)
    """Conservative decoding: outside the expert's top-p set the expert/reference ratio is 1."""
    startup_timeout_s: float = Field(300.0, gt=0)
    """How long startup waits for the pools to answer Info (vocabulary check)."""
    health_probe_period_s: float = Field(2.0, gt=0)
    """Health: every period each pool's Info is probed (under the timeout); gRPC health checks
    answer SERVING only while every pool answered its last probe."""
    health_probe_timeout_s: float = Field(1.0, gt=0)
    """Budget of one pool's health probe."""
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    """Server defaults of speculative up-scaling."""
    access_log: AccessLogConfig = Field(default_factory=AccessLogConfig)
    """The per-request JSON access log."""
    replica: ReplicaConfig = Field(default_factory=lambda: ReplicaConfig(num_cpus=0.5, max_ongoing_requests=64))
    """Serve replica options of the coordinator."""

    @model_validator(mode="after")
    def _timeouts(self) -> CoordinatorConfig:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError(
                f"coordinator.default_timeout_s ({self.default_timeout_s}) exceeds max_timeout_s ({self.max_timeout_s})"
            )
        return self


class GrpcConfig(StrictModel):
    """Serve's gRPC proxy, the client-facing API."""

    port: int = Field(9000, ge=0, le=65535)
    """Port of Serve's gRPC proxy (plain-text HTTP/2; on loopback locally)."""
    request_timeout_s: float | None = Field(None, gt=0)
    """The Serve proxy's end-to-end request timeout; None = coordinator.max_timeout_s + a margin."""
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=2**31 - 1)
    """Largest gRPC message the proxy accepts or sends (Serve's own default is 2 GiB). Serve has no
    config key for it: it reads RAY_SERVE_GRPC_MAX_MESSAGE_SIZE from the proxy's environment
    (`serve.app.proxy_env`), which `eft serve` and the Kubernetes head pod set from this."""


class HttpConfig(StrictModel):
    """Serve's HTTP proxy, which carries the OpenAI-compatible API (docs/api.md)."""

    host: str = "127.0.0.1"
    """Loopback by default: listening elsewhere is a deliberate choice (with auth on)."""
    port: int = Field(8000, ge=0, le=65535)
    """Port of Serve's HTTP proxy (`eft serve --http-port`)."""
    openai: bool = True
    """GET /v1/models, POST /v1/completions and /v1/chat/completions, served by the coordinator
    replicas themselves (the same decode loop, API keys and quotas as gRPC); false: no routes."""


class AuthConfig(StrictModel):
    """API keys on the client-facing gRPC API (docs/security.md#api-keys); off by default."""

    enabled: bool = False
    """Require an API key on every `EftService` call and on the OpenAI routes."""
    keys_file: str | None = None
    """YAML keys file (sha256 hashes only; `eft keys add` writes it), readable where the coordinator runs."""
    keys_env: str | None = None
    """Name of an environment variable holding the same YAML (e.g. a Kubernetes Secret as env)."""
    quota_store: Literal["auto", "redis", "local"] = "auto"
    """Where per-key quotas are counted (docs/quotas.md): redis = one count for all coordinator
    replicas in the result cache's Redis (cache.url, its credentials), per replica while it does
    not answer; local = per replica; auto = redis when cache.url is set."""
    quota_lease_ttl_s: float = Field(10.0, gt=0)
    """A stream's lease in Redis expires this long after its replica last renewed it (every third
    of it): how long a crashed replica's streams keep their slots."""
    quota_op_timeout_s: float = Field(0.25, gt=0)
    """One quota round trip to Redis; slower counts as Redis down (per replica until it answers)."""

    @model_validator(mode="after")
    def _has_keys(self) -> AuthConfig:
        if self.enabled and self.keys_file is None and self.keys_env is None:
            raise ValueError("auth.enabled needs auth.keys_file or auth.keys_env")
        return self


class TlsConfig(StrictModel):
    """TLS (mTLS when `client_ca_file` is set) in front of Serve's plain-HTTP/2 gRPC proxy.

    `eft serve` runs a local nginx (`infra/tls_proxy.py`) that terminates TLS on `host:port` and
    forwards to the Serve gRPC port; on Kubernetes the Ingress does the same (`k8s/settings`).
    """

    enabled: bool = False
    """Run the nginx TLS front (`eft serve`)."""
    host: str = "127.0.0.1"
    """Loopback by default: listening elsewhere is a deliberate choice (with auth on)."""
    port: int = Field(9443, ge=0, le=65535)
    """Port of the TLS front."""
    cert_file: str | None = None
    """PEM server certificate (chain)."""
    key_file: str | None = None
    """PEM private key of cert_file."""
    client_ca_file: str | None = None
    """PEM CA bundle: clients must present a certificate it signed (mTLS); None = server TLS only."""
    max_body_bytes: int = Field(4 * 2**20, ge=1)
    """nginx's client_max_body_size (gRPC's default message limit is 4 MiB)."""
    nginx_binary: str | None = None
    """nginx binary; None = .venv/opt/nginx (scripts/setup.sh), then PATH, then /usr/sbin/nginx."""

    @model_validator(mode="after")
    def _has_cert(self) -> TlsConfig:
        if self.enabled and not (self.cert_file and self.key_file):
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file (PEM)")
        return self


class RayConfig(StrictModel):
    """The Ray cluster `eft serve` starts, or the one it joins."""

    address: str | None = None
    """None: start a local cluster (`eft serve`); else connect, e.g. "ray://..." or "auto"."""
    node_ip_address: str = "127.0.0.2"
    """127.0.0.1 is silently replaced by Ray with the interface address; 127.0.0.2 is kept."""
    num_cpus: int | None = None
    """CPUs of the local cluster; null = Ray's own count."""
    namespace: str = "eft"
    """Ray namespace of the Serve applications."""
    temp_dir: str | None = None
    """Where `eft serve`'s local cluster keeps its logs and sockets."""


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
            if pool.base_pool is not None and pool.engine != "hf":
                raise ValueError(f"pools.{role}: a LoRA adapter pool runs on the hf engine (engine: hf) for now")
            continue
        if pool.base_pool not in (None, pool.colocate_with):
            raise ValueError(
                f"pools.{role}: colocate_with {pool.colocate_with!r} must be the adapter's base_pool "
                f"({pool.base_pool!r}); an adapter is served inside its base's pool"
            )
        if pools[pool.colocate_with].engine != "hf":
            raise ValueError(
                f"pools.{role}.colocate_with {pool.colocate_with!r}: co-located adapters run on the hf engine "
                f"for now; set pools.{pool.colocate_with}.engine: hf, or drop colocate_with (a pool of its own)"
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


def _upscale_recipes(with_large_ft: bool, with_expert_b: bool, with_chat: bool = False) -> dict[str, RecipeConfig]:
    recipes = {
        "upscale": RecipeConfig(
            description="LM up-scaling: large base steered by the small fine-tune's behaviour delta",
            base="large_base",
            experts=["small_ft"],
            reference="small_base",
        ),
        "large_base": RecipeConfig(description="the large base model alone", base="large_base"),
        "small_ft": RecipeConfig(description="the small fine-tuned model alone", base="small_ft"),
        "small_base": RecipeConfig(description="the small base model alone", base="small_base"),
    }
    if with_expert_b:
        recipes["interpolate"] = RecipeConfig(
            description="behaviour interpolation: two small experts over one reference, weights per request",
            base="large_base",
            experts=["small_ft", "small_ft_b"],
            reference="small_base",
            default_weights={"small_ft": 1.0, "small_ft_b": 0.0},
        )
        recipes["small_ft_b"] = RecipeConfig(description="the second small expert alone", base="small_ft_b")
    if with_large_ft:
        recipes["downscale"] = RecipeConfig(
            description="down-scaling: small base steered by the large fine-tune's behaviour delta",
            base="small_base",
            experts=["large_ft"],
            reference="large_base",
        )
        recipes["large_ft"] = RecipeConfig(
            description="the large fine-tuned model alone (ground truth)", base="large_ft"
        )
    if with_chat:
        # The chat expert sees chat requests in its own chat template ("own", the default); the
        # bases have none and were pretrained on Q/A text, so they get it in that format.
        qa = PromptTemplate(template=QA_TEMPLATE)
        recipes["upscale_chat"] = RecipeConfig(
            description="LM up-scaling with a chat expert: each model sees a chat request in its own format",
            base="large_base",
            experts=["small_chat"],
            reference="small_base",
            prompt_format={"large_base": qa, "small_base": qa},
        )
        recipes["small_chat"] = RecipeConfig(description="the small chat expert alone", base="small_chat")
    return recipes


def demo_config(full_family: bool = False, with_chat: bool = False) -> EftConfig:
    """The built-in stack: the demo family's pools and the up-scaling recipes.

    `full_family` adds the second expert and the large fine-tune (interpolation, down-scaling).
    `with_chat` adds the chat expert (`small_chat`, recipes `small_chat` and `upscale_chat`;
    `deploy/demo_chat.yaml`). Each is opt-in: every pool is one more replica (a CPU) to start.
    """
    roles = ["large_base", "small_base", "small_ft"]
    if full_family:
        roles += ["small_ft_b", "large_ft"]
    if with_chat:
        roles += ["small_chat"]
    pools = {role: PoolConfig(model=f"{DEMO_SCHEME}{role}") for role in roles}
    return EftConfig(pools=pools, recipes=_upscale_recipes(full_family, full_family, with_chat))


def load_config(path: str | Path | None) -> EftConfig:
    """Load a YAML overlay over the built-in demo stack (`config_overlay`); `None` gives the stack.

    A full tree (deploy/*.yaml) loads as itself. Raises `ConfigError`, one line naming key paths.
    """
    if path is None:
        return demo_config()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    overlay, replace = split_replace(data, str(path))
    merged = merge_overlay(demo_config().model_dump(mode="json"), overlay, replace)
    try:
        return EftConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, str(path))) from None
