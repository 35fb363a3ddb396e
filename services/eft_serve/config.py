"""The one validated configuration tree (pydantic) for pools, recipes, coordinator, cache and Ray.

Owns the schema, its defaults (the built-in demo stack) and YAML loading. The Serve builder, the
CLI and the Kubernetes renderer all read an `EftConfig`; nothing else parses config files.
Knows nothing about how the config is executed. Unknown keys are errors everywhere
(`extra="forbid"`), because Ray Serve silently ignores unknown keys and a typo must not pass.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from eft_serve.cache.config import CacheConfig, LocalRedisConfig
from eft_serve.core.chat_format import compile_template
from eft_serve.demo.world import QA_TEMPLATE
from eft_serve.engine.vllm_config import VLLMConfig
from eft_serve.strict_model import StrictModel

DEMO_SCHEME = "demo:"


class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    metrics_interval_s: float = Field(1.0, gt=0)
    look_back_period_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ReplicaConfig(StrictModel):
    """Ray Serve replica options for one deployment (a pool or the coordinator)."""

    num_replicas: int = Field(1, ge=1, description="fixed replica count when autoscaling is off")
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(16, ge=1)
    # Beyond this many queued requests the caller gets RESOURCE_EXHAUSTED instead of waiting.
    max_queued_requests: int = Field(128, ge=-1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_bytes: int | None = Field(None, ge=0)
    # Custom resource that only this pool's node group offers (placement on its own nodes).
    node_group_resource: str | None = None
    resources: dict[str, float] = Field(default_factory=dict)
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0)
    health_check_period_s: float = Field(5.0, gt=0)
    # Linux CPU ids every thread of each replica runs on (None: wherever the OS schedules). For
    # CPU hosts that run several deployments: give the large base cores of its own (infra.cpu_affinity).
    cpu_affinity: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)

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

    # Local Hugging Face model directory, or `demo:<role>` for the built-in demo family.
    model: str
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"
    # Per-replica KV budget in bytes (0 = keep no KV). null = sized from memory when the replica
    # loads: half of (replica.memory_bytes − weights) when memory_bytes is set, else half of the
    # GPU's free memory, else a fifth of the host's available memory (engine/kv_budget.py).
    # Sequences that do not fit wait for room (then RESOURCE_EXHAUSTED); running ones are never evicted.
    kv_cache_bytes: int | None = Field(None, ge=0)
    torch_threads: int = Field(1, ge=1)
    # Pool calls waiting when the engine frees are coalesced into its next call, up to this many
    # (continuous batching, engine/turn_queue.py); engines that schedule calls themselves (vLLM)
    # get them all at once instead.
    max_batch_size: int = Field(32, ge=1)
    # Longest a turn waits for the sequences the pool expects back (those that called every
    # step lately), so streams decoding together share turns; a lone stream never waits.
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    # Chunked prefill: prompt positions an engine turn with decoding streams in it feeds beyond
    # their rows; a longer prefill is split over turns so running streams keep stepping
    # (null: whole prefills). vLLM chunks with its own scheduler instead.
    max_prefill_tokens_per_turn: int | None = Field(256, ge=16)
    # Send every call of one sequence to the same replica (its KV cache), least loaded when it is
    # full; off = Serve's default router (power of two choices).
    kv_affinity: bool = True
    # Serve's periodic replica health check runs a 1-token forward (queued fairly with requests);
    # slower than this, or failing, and Serve restarts the replica.
    health_check_timeout_s: float = Field(10.0, gt=0)
    # Calls in flight per replica: at least max_batch_size, or the router holds back batch-mates.
    replica: ReplicaConfig = Field(default_factory=lambda: ReplicaConfig(max_ongoing_requests=64))
    # "hf": the transformers reference engine (exact, portable); "vllm": vLLM (paged KV, continuous
    # batching, prefix caching, tensor parallelism), options under `vllm`.
    engine: Literal["hf", "vllm"] = "hf"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

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
    base: str
    experts: list[str] = Field(default_factory=list)
    reference: str | None = None
    # Default expert weights before the per-request β scaling; experts not named default to 1.
    default_weights: dict[str, float] = Field(default_factory=dict)
    # Chat requests only: the prompt format per role of the recipe; roles not named get "own".
    prompt_format: dict[str, PromptFormat] = Field(default_factory=dict)

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

    # Server default for requests that do not say; a request may turn it on or off.
    enabled: bool = False
    # Most tokens drafted per block (a request may ask for fewer, never more).
    max_draft_tokens: int = Field(8, ge=1, le=64)
    # Grow the block after a fully accepted one, shrink it after an early rejection.
    adaptive: bool = True
    # Who drafts: "expert" = the recipe's first expert with a non-zero weight (the small
    # fine-tuned model in up-scaling), or a pool role name.
    drafter: str = "expert"
    # "coupled": a drafted token is kept iff the token plain decoding would choose at that
    # position (same seed) equals it, so output is identical to non-speculative decoding;
    # "rejection": standard speculative rejection sampling (same distribution, not same text).
    acceptance: Literal["coupled", "rejection"] = "coupled"


class AccessLogConfig(StrictModel):
    """One JSON line per request from the coordinator (logger `eft_serve.access`, README.md#metrics)."""

    enabled: bool = True
    # Prompt text is user data: off unless an operator turns it on.
    include_prompt: bool = False


class CoordinatorConfig(StrictModel):
    default_recipe: str = "upscale"
    # Per-model top-k used for merging when a request does not say; 0 = exact full vocabulary.
    default_logprob_top_k: int = Field(20, ge=0)
    max_logprob_top_k: int = Field(1024, ge=1)
    # Most alternatives a request may ask for per generated token (`top_logprobs`).
    max_top_logprobs: int = Field(20, ge=0)
    default_max_new_tokens: int = Field(64, ge=1)
    max_new_tokens_cap: int = Field(512, ge=1)
    max_stop_strings: int = Field(16, ge=0)
    # Longest stop string in characters (each is matched against the text of every new token).
    max_stop_string_chars: int = Field(256, ge=1)
    # A prompt longer than this many UTF-8 bytes is refused before it is tokenized.
    max_prompt_bytes: int = Field(256 * 1024, ge=1)
    # Most tokens a Score continuation may have (each is one scored position in every pool).
    max_score_continuation_tokens: int = Field(512, ge=1)
    # Exact mode (logprob_top_k = 0: full-vocabulary logprobs from every pool) is costly; off
    # refuses it with PERMISSION_DENIED for every caller (API keys can refuse it per key too).
    allow_exact_mode: bool = True
    default_timeout_s: float = Field(120.0, gt=0)
    # The largest timeout_s a request may ask for (INVALID_ARGUMENT above); the gRPC proxy's
    # request timeout defaults to this plus a margin (`grpc.request_timeout_s`).
    max_timeout_s: float = Field(600.0, gt=0)
    # One pool call slower than this is reported UNAVAILABLE instead of hanging the stream.
    pool_call_timeout_s: float = Field(30.0, gt=0)
    # The wire is stateless, so a failed pool call is retried (another replica may serve it)
    # while the request's deadline allows; a lost replica costs a recompute, not a request.
    pool_call_retries: int = Field(2, ge=0)
    # Retries (connection-level failures only) may add at most this fraction of the pool calls
    # made (plus a small reserve), so an outage is not multiplied into a retry storm.
    pool_call_retry_budget: float = Field(0.1, ge=0, le=1)
    # Concurrent streams' pool calls of one event-loop turn leave as one call per pool replica
    # (coordinator.call_coalescer): far fewer Serve calls at the same KV affinity.
    coalesce_pool_calls: bool = True
    conservative_top_p: float = Field(0.9, gt=0, le=1)
    # How long startup waits for the pools to answer Info (vocabulary check).
    startup_timeout_s: float = Field(300.0, gt=0)
    # Health: every period each pool's Info is probed (under the timeout); gRPC health checks
    # answer SERVING only while every pool answered its last probe.
    health_probe_period_s: float = Field(2.0, gt=0)
    health_probe_timeout_s: float = Field(1.0, gt=0)
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    access_log: AccessLogConfig = Field(default_factory=AccessLogConfig)
    replica: ReplicaConfig = Field(default_factory=lambda: ReplicaConfig(num_cpus=0.5, max_ongoing_requests=64))

    @model_validator(mode="after")
    def _timeouts(self) -> CoordinatorConfig:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError(
                f"coordinator.default_timeout_s ({self.default_timeout_s}) exceeds max_timeout_s ({self.max_timeout_s})"
            )
        return self


class GrpcConfig(StrictModel):
    port: int = Field(9000, ge=0, le=65535)
    # The Serve proxy's end-to-end request timeout; None = coordinator.max_timeout_s + a margin.
    request_timeout_s: float | None = Field(None, gt=0)
    # Largest gRPC message the proxy accepts or sends (Serve's own default is 2 GiB). Serve has no
    # config key for it: it reads RAY_SERVE_GRPC_MAX_MESSAGE_SIZE from the proxy's environment
    # (`serve.app.proxy_env`), which `eft serve` and the Kubernetes head pod set from this.
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=2**31 - 1)


class HttpConfig(StrictModel):
    """Serve's HTTP proxy, which carries the OpenAI-compatible API (README.md#openai-compatible-api)."""

    # Loopback by default: listening elsewhere is a deliberate choice (with auth on).
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # GET /v1/models, POST /v1/completions and /v1/chat/completions, served by the coordinator
    # replicas themselves (the same decode loop, API keys and quotas as gRPC); false: no routes.
    openai: bool = True


class AuthConfig(StrictModel):
    """API keys on the client-facing gRPC API (README.md#authentication); off by default."""

    enabled: bool = False
    # YAML keys file (sha256 hashes only; `eft keys add` writes it), readable where the coordinator runs.
    keys_file: str | None = None
    # Name of an environment variable holding the same YAML (e.g. a Kubernetes Secret as env).
    keys_env: str | None = None

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
    # Loopback by default: listening elsewhere is a deliberate choice (with auth on).
    host: str = "127.0.0.1"
    port: int = Field(9443, ge=0, le=65535)
    cert_file: str | None = None  # PEM server certificate (chain)
    key_file: str | None = None  # PEM private key of cert_file
    # PEM CA bundle: clients must present a certificate it signed (mTLS); None = server TLS only.
    client_ca_file: str | None = None
    # nginx's client_max_body_size (gRPC's default message limit is 4 MiB).
    max_body_bytes: int = Field(4 * 2**20, ge=1)
    # nginx binary; None = .venv/opt/nginx (scripts/setup.sh), then PATH, then /usr/sbin/nginx.
    nginx_binary: str | None = None

    @model_validator(mode="after")
    def _has_cert(self) -> TlsConfig:
        if self.enabled and not (self.cert_file and self.key_file):
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file (PEM)")
        return self


class RayConfig(StrictModel):
    # None: start a local cluster (`eft serve`); else connect, e.g. "ray://..." or "auto".
    address: str | None = None
    # 127.0.0.1 is silently replaced by Ray with the interface address; 127.0.0.2 is kept.
    node_ip_address: str = "127.0.0.2"
    num_cpus: int | None = None
    namespace: str = "eft"
    # Where `eft serve`'s local cluster keeps its logs and sockets.
    temp_dir: str | None = None


class EftConfig(StrictModel):
    pools: dict[str, PoolConfig]
    recipes: dict[str, RecipeConfig]
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    local_redis: LocalRedisConfig = Field(default_factory=LocalRedisConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

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
    """Load a YAML config; `None` gives the built-in demo stack."""
    if path is None:
        return demo_config()
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    return EftConfig.model_validate(data)
