"""The client-facing doors and the cluster: gRPC and HTTP proxies, API keys, TLS, Ray.

Owns the schema of how clients reach the service and who may (auth, TLS), and which Ray cluster
it runs on. Knows nothing of what a request does once admitted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from eft_serve.strict_model import StrictModel


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
