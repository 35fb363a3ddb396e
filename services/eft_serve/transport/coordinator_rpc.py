"""The bodies of the client-facing `eft.v1.EftService` RPCs, over an `EftCoordinator`.

Owns proto <-> coordinator conversion per RPC. Every RPC is admitted through `Admission` (the
same path as the OpenAI routes): each servicer passes its call's metadata, authenticated once per
call; Generate/Complete/Score take a quota lease (released when the call ends, also on cancel;
generated tokens charged as they stream), the listing RPCs need a valid key only. Raises `EftError`s; every servicer (the plain grpc.aio one,
the Ray Serve deployment) maps them through `transport.error_boundary`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from eft_serve.auth.gate import Gate, Metadata
from eft_serve.auth.quotas import Lease
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.coordinator.telemetry import NULL_TELEMETRY, RequestRecord, RequestTrace, Telemetry
from eft_serve.proto_gen.eft.v1 import eft_pb2
from eft_serve.transport.admission import Admission
from eft_serve.transport.client_messages import (
    FINISH_TO_PROTO,
    generation_request_from_proto,
    merge_from_proto,
    score_to_proto,
    token_to_proto,
    usage_to_proto,
)
from eft_serve.transport.metered_stream import open_metered
from eft_serve.wire.pool_messages import info_to_proto


class CoordinatorRpc:
    def __init__(
        self, coordinator: EftCoordinator, gate: Gate | None = None, telemetry: Telemetry = NULL_TELEMETRY
    ) -> None:
        self.coordinator = coordinator
        self.admission = Admission(gate, coordinator)  # gate None: no authentication (auth.enabled: false)
        self.telemetry = telemetry  # metrics and the access log (`coordinator.telemetry`)

    def _trace(self, method: str, request_id: str, merge: eft_pb2.MergeParams, prompt: str) -> RequestTrace:
        recipe = merge.recipe or self.coordinator.default_recipe
        return RequestTrace(self.telemetry, RequestRecord(method, request_id, recipe, prompt=prompt))

    async def _admit(self, metadata: Metadata, merge: eft_pb2.MergeParams) -> Lease:
        """One call's admission: authenticate once, then its one stream's lease."""
        caller = self.admission.authenticate(metadata)
        top_k = merge.logprob_top_k if merge.HasField("logprob_top_k") else None
        return await self.admission.admit(caller, merge.recipe or None, top_k)

    def _authenticate(self, metadata: Metadata) -> None:
        self.admission.authenticate(metadata)

    async def generate(
        self, request: eft_pb2.GenerateRequest, metadata: Metadata = ()
    ) -> AsyncIterator[eft_pb2.GenerateResponse]:
        trace = self._trace("Generate", request.request_id, request.merge, request.prompt)
        stream = await open_metered(
            self.coordinator,
            lambda: generation_request_from_proto(request),
            lambda: self._admit(metadata, request.merge),
            trace,
        )

        async def messages() -> AsyncIterator[eft_pb2.GenerateResponse]:
            try:
                async for chunk in stream:
                    yield eft_pb2.GenerateResponse(
                        text=chunk.text,
                        tokens=[token_to_proto(t) for t in chunk.tokens],
                        finish_reason=FINISH_TO_PROTO[chunk.finish_reason],
                        usage=usage_to_proto(chunk.usage) if chunk.usage else None,
                        request_id=request.request_id,
                    )
            finally:  # ended, failed, or cancelled by the client at a yield: release and end the trace
                await stream.aclose()

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
        if not (request.return_logprobs or request.return_model_logprobs or request.top_logprobs > 0):
            del out.tokens[:]
        return out

    async def score(self, request: eft_pb2.ScoreRequest, metadata: Metadata = ()) -> eft_pb2.ScoreResponse:
        trace = self._trace("Score", "", request.merge, request.prompt)
        try:
            lease = await self._admit(metadata, request.merge)
            trace.record.key_id = lease.key_id or "-"
            try:
                result = await self.coordinator.score(
                    request.prompt, request.continuation, merge_from_proto(request.merge), request.timeout_s or None
                )
            finally:
                lease.release()
        except BaseException as e:
            trace.finish(e)
            raise
        trace.record.prompt_tokens = result.prompt_tokens
        trace.finish()
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
