"""Python clients for the `eft.v1.EftService` gRPC API: `EftClient` (sync) and `AsyncEftClient`.

Owns request building from keyword arguments and the channel. Streaming `generate` yields
`GenerateResponse` messages (text deltas; the last one carries finish reason and usage).
Errors surface as `grpc.RpcError` with the server's status code and actionable details.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eft_serve.proto_gen.eft.v1 import eft_pb2, eft_pb2_grpc


def build_merge(
    recipe: str | None = None,
    beta: float | None = None,
    expert_weights: Mapping[str, float] | None = None,
    conservative: bool = False,
    conservative_top_p: float | None = None,
    logprob_top_k: int | None = None,
) -> eft_pb2.MergeParams:
    m = eft_pb2.MergeParams(recipe=recipe or "", conservative=conservative, expert_weights=dict(expert_weights or {}))
    if beta is not None:
        m.beta = beta
    if conservative_top_p is not None:
        m.conservative_top_p = conservative_top_p
    if logprob_top_k is not None:
        m.logprob_top_k = logprob_top_k
    return m


def build_generate_request(
    prompt: str,
    *,
    recipe: str | None = None,
    beta: float | None = None,
    expert_weights: Mapping[str, float] | None = None,
    conservative: bool = False,
    conservative_top_p: float | None = None,
    logprob_top_k: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    return_logprobs: bool = False,
    return_model_logprobs: bool = False,
    timeout_s: float = 0.0,
    request_id: str = "",
    speculative: bool | None = None,
    max_draft_tokens: int | None = None,
    adaptive_draft: bool | None = None,
) -> eft_pb2.GenerateRequest:
    s = eft_pb2.SamplingParams(top_k=top_k, stop=list(stop), ignore_eos=ignore_eos)
    if temperature is not None:
        s.temperature = temperature
    if top_p is not None:
        s.top_p = top_p
    if seed is not None:
        s.seed = seed
    if max_new_tokens is not None:
        s.max_new_tokens = max_new_tokens
    spec = eft_pb2.SpeculativeParams()
    if speculative is not None:
        spec.enabled = speculative
    if max_draft_tokens is not None:
        spec.max_draft_tokens = max_draft_tokens
    if adaptive_draft is not None:
        spec.adaptive = adaptive_draft
    return eft_pb2.GenerateRequest(
        prompt=prompt,
        merge=build_merge(recipe, beta, expert_weights, conservative, conservative_top_p, logprob_top_k),
        sampling=s,
        return_logprobs=return_logprobs,
        return_model_logprobs=return_model_logprobs,
        timeout_s=timeout_s,
        request_id=request_id,
        speculative=spec,
    )


class EftClient:
    """Blocking client. `timeout` is the gRPC deadline per call (seconds, None = none)."""

    def __init__(self, address: str = "127.0.0.1:9000", timeout: float | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address)
        self._stub = eft_pb2_grpc.EftServiceStub(self._channel)

    def generate(self, prompt: str, **params) -> Iterator[eft_pb2.GenerateResponse]:
        return self._stub.Generate(build_generate_request(prompt, **params), timeout=self.timeout)

    def complete(self, prompt: str, **params) -> eft_pb2.CompleteResponse:
        return self._stub.Complete(build_generate_request(prompt, **params), timeout=self.timeout)

    def score(self, prompt: str, continuation: str, **merge) -> eft_pb2.ScoreResponse:
        return self._stub.Score(
            eft_pb2.ScoreRequest(prompt=prompt, continuation=continuation, merge=build_merge(**merge)),
            timeout=self.timeout,
        )

    def list_models(self) -> eft_pb2.ListModelsResponse:
        return self._stub.ListModels(eft_pb2.ListModelsRequest(), timeout=self.timeout)

    def list_recipes(self) -> eft_pb2.ListRecipesResponse:
        return self._stub.ListRecipes(eft_pb2.ListRecipesRequest(), timeout=self.timeout)

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self._channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout).status

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EftClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEftClient:
    """asyncio client; `generate` returns an async iterator of stream messages."""

    def __init__(self, address: str = "127.0.0.1:9000", timeout: float | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = eft_pb2_grpc.EftServiceStub(self._channel)

    def generate(self, prompt: str, **params) -> AsyncIterator[eft_pb2.GenerateResponse]:
        return self._stub.Generate(build_generate_request(prompt, **params), timeout=self.timeout)

    async def complete(self, prompt: str, **params) -> eft_pb2.CompleteResponse:
        return await self._stub.Complete(build_generate_request(prompt, **params), timeout=self.timeout)

    async def score(self, prompt: str, continuation: str, **merge) -> eft_pb2.ScoreResponse:
        return await self._stub.Score(
            eft_pb2.ScoreRequest(prompt=prompt, continuation=continuation, merge=build_merge(**merge)),
            timeout=self.timeout,
        )

    async def list_models(self) -> eft_pb2.ListModelsResponse:
        return await self._stub.ListModels(eft_pb2.ListModelsRequest(), timeout=self.timeout)

    async def list_recipes(self) -> eft_pb2.ListRecipesResponse:
        return await self._stub.ListRecipes(eft_pb2.ListRecipesRequest(), timeout=self.timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncEftClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
