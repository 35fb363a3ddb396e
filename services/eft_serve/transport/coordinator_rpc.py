"""The bodies of the client-facing `eft.v1.EftService` RPCs, over an `EftCoordinator`.

Owns proto <-> coordinator conversion per RPC. Raises `EftError`s; every servicer (the plain
grpc.aio one, the Ray Serve deployment) maps them through `transport.error_boundary`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

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
    def __init__(self, coordinator: EftCoordinator) -> None:
        self.coordinator = coordinator

    async def generate(self, request: eft_pb2.GenerateRequest) -> AsyncIterator[eft_pb2.GenerateResponse]:
        req = generation_request_from_proto(request)
        stream = await self.coordinator.generate(req)  # validation errors raise here

        async def messages() -> AsyncIterator[eft_pb2.GenerateResponse]:
            async for chunk in stream:
                yield eft_pb2.GenerateResponse(
                    text=chunk.text,
                    tokens=[token_to_proto(t) for t in chunk.tokens],
                    finish_reason=FINISH_TO_PROTO[chunk.finish_reason],
                    usage=usage_to_proto(chunk.usage) if chunk.usage else None,
                    request_id=req.request_id,
                )

        return messages()

    async def complete(self, request: eft_pb2.GenerateRequest) -> eft_pb2.CompleteResponse:
        stream = await self.generate(request)
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

    async def score(self, request: eft_pb2.ScoreRequest) -> eft_pb2.ScoreResponse:
        result = await self.coordinator.score(
            request.prompt, request.continuation, merge_from_proto(request.merge), request.timeout_s or None
        )
        return score_to_proto(result)

    def list_models(self) -> eft_pb2.ListModelsResponse:
        return eft_pb2.ListModelsResponse(
            models=[info_to_proto(info, role) for role, info in self.coordinator.infos.items()]
        )

    def list_recipes(self) -> eft_pb2.ListRecipesResponse:
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
