"""The bodies of the client-facing `eft.v1.EftService` RPCs, over an `EftCoordinator`.

Owns proto <-> coordinator conversion per RPC and, with a `Gate`, the one place every RPC is
admitted: each servicer passes its call's metadata, Generate/Complete/Score take a quota lease
(released when the call ends, also on cancel; generated tokens charged as they stream), the
listing RPCs need a valid key only. Raises `EftError`s; every servicer (the plain grpc.aio one,
the Ray Serve deployment) maps them through `transport.error_boundary`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from eft_serve.auth.gate import Gate, Metadata
from eft_serve.auth.quotas import NO_LIMIT, Lease
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.proto_gen.eft.v1 import eft_pb2
from eft_serve.transport.client_messages import (
    FINISH_TO_PROTO,
    generation_request_from_proto,
    merge_from_proto,
    score_to_proto,
    token_to_proto,
    usage_to_proto,
)
from eft_serve.wire.pool_messages import info_to_proto


class CoordinatorRpc:
    def __init__(self, coordinator: EftCoordinator, gate: Gate | None = None) -> None:
        self.coordinator = coordinator
        self.gate = gate  # None: no authentication (auth.enabled: false)

    def _admit(self, metadata: Metadata, merge: eft_pb2.MergeParams) -> Lease:
        if self.gate is None:
            return NO_LIMIT
        recipe = merge.recipe or self.coordinator.default_recipe
        top_k = merge.logprob_top_k if merge.HasField("logprob_top_k") else self.coordinator.default_logprob_top_k
        return self.gate.admit(metadata, recipe, exact=top_k == 0)

    def _authenticate(self, metadata: Metadata) -> None:
        if self.gate is not None:
            self.gate.authenticate(metadata)

    async def generate(
        self, request: eft_pb2.GenerateRequest, metadata: Metadata = ()
    ) -> AsyncIterator[eft_pb2.GenerateResponse]:
        lease = self._admit(metadata, request.merge)  # auth and quota errors raise here
        try:
            req = generation_request_from_proto(request)
            stream = await self.coordinator.generate(req)  # validation errors raise here
        except BaseException:
            lease.release()
            raise

        async def messages() -> AsyncIterator[eft_pb2.GenerateResponse]:
            try:
                async for chunk in stream:
                    lease.charge(len(chunk.tokens))
                    yield eft_pb2.GenerateResponse(
                        text=chunk.text,
                        tokens=[token_to_proto(t) for t in chunk.tokens],
                        finish_reason=FINISH_TO_PROTO[chunk.finish_reason],
                        usage=usage_to_proto(chunk.usage) if chunk.usage else None,
                        request_id=req.request_id,
                    )
            finally:  # the stream ended, failed or was cancelled by the client
                lease.release()

        return messages()

    async def complete(self, request: eft_pb2.GenerateRequest, metadata: Metadata = ()) -> eft_pb2.CompleteResponse:
        stream = await self.generate(request, metadata)
        out = eft_pb2.CompleteResponse(request_id=request.request_id)
        text: list[str] = []
        async for msg in stream:
            text.append(msg.text)
            for t in msg.tokens:
                out.token_ids.append(t.token_id)
            out.tokens.extend(msg.tokens)
            if msg.HasField("usage"):
                out.usage.CopyFrom(msg.usage)
                out.finish_reason = msg.finish_reason
        out.text = "".join(text)
        if not (request.return_logprobs or request.return_model_logprobs):
            del out.tokens[:]
        return out

    async def score(self, request: eft_pb2.ScoreRequest, metadata: Metadata = ()) -> eft_pb2.ScoreResponse:
        lease = self._admit(metadata, request.merge)
        try:
            result = await self.coordinator.score(
                request.prompt, request.continuation, merge_from_proto(request.merge), request.timeout_s or None
            )
        finally:
            lease.release()
        return score_to_proto(result)

    def list_models(self, metadata: Metadata = ()) -> eft_pb2.ListModelsResponse:
        self._authenticate(metadata)
        return eft_pb2.ListModelsResponse(
            models=[info_to_proto(info, role) for role, info in self.coordinator.infos.items()]
        )

    def list_recipes(self, metadata: Metadata = ()) -> eft_pb2.ListRecipesResponse:
        self._authenticate(metadata)
        out = eft_pb2.ListRecipesResponse(default_recipe=self.coordinator.default_recipe)
        for name, r in self.coordinator.recipe_table().items():
            out.recipes.append(
                eft_pb2.RecipeInfo(
                    name=name,
                    description=r.description,
                    base=r.base,
                    experts=r.experts,
                    reference=r.reference or "",
                    default_expert_weights={e: r.default_weights.get(e, 1.0) for e in r.experts},
                    formula=recipe_formula(r.base, r.experts, r.reference),
                )
            )
        return out


def recipe_formula(base: str, experts: list[str], reference: str | None) -> str:
    if not experts:
        return f"log p_{base}"
    terms = " + ".join(f"w_{e}·(log p_{e} − log p_{reference})" for e in experts)
    return f"log p_{base} + β·[{terms}]"
