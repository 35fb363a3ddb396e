"""The OpenAI-compatible API over an `EftCoordinator`: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Owns the translation of OpenAI request bodies into coordinator `GenerationRequest`s (the `model`
is a recipe name; `n` choices are n independent coordinator streams with seeds seed + i; chat
`messages` go to the coordinator as `ChatMessage`s, which renders each pool's prompt), the
streaming of those choices' chunks into one response (whole, or SSE events; their shapes are
`openai_views`'), and admission through the same `Admission` as gRPC: the caller authenticated
once per request (`Authorization: Bearer <key>`), then one quota lease per choice, tokens charged
as they stream. Each choice is one call for the telemetry (metrics, access log; methods
`OpenAI.Completions` / `OpenAI.ChatCompletions`). One decode loop: the coordinator's.

Logprobs are the merged (EFT) distribution's: completions `logprobs: N` and chat `top_logprobs: N`
become the coordinator's `top_logprobs = N` (the N most likely tokens at each step, from the merged
support: in top-k mode the union of the models' top-k, the distribution sampled from).

Raises `EftError`s (`BadParam` for a bad body); the HTTP layer maps them with `openai_errors`.
Knows nothing of HTTP frameworks or Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from eft_serve.auth.gate import Gate, Metadata
from eft_serve.coordinator.request import (
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    MergeOptions,
    SpeculativeOptions,
)
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.coordinator.telemetry import NULL_TELEMETRY, RequestRecord, RequestTrace, Telemetry
from eft_serve.transport.admission import ANONYMOUS, Admission, Caller
from eft_serve.transport.metered_stream import MeteredStream, open_metered
from eft_serve.transport.openai_errors import ModelNotFound, to_http_error
from eft_serve.transport.openai_extras import recipe_card
from eft_serve.transport.openai_schema import BadParam, ChatCompletionBody, CommonBody, CompletionBody, parse_body
from eft_serve.transport.openai_views import DONE, ChatView, Choice, Collected, CompletionView, View, sse

__all__ = ["DONE", "OpenAIApi", "sse"]

OWNED_BY = "eft-serve"


async def _merge(streams: list[MeteredStream]) -> AsyncGenerator[tuple[int, GenerationChunk], None]:
    """(choice index, chunk) from every stream as they come; the first failure ends it (all closed)."""
    if len(streams) == 1:
        try:
            async for chunk in streams[0]:
                yield 0, chunk
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, GenerationChunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: MeteredStream) -> None:
        try:
            async for chunk in stream:
                await queue.put((i, chunk, None))
            await queue.put((i, None, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, got, error = await queue.get()
            if error is not None:
                raise error
            if got is None:
                remaining -= 1
                continue
            yield i, got
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


class OpenAIApi:
    def __init__(
        self,
        coordinator: EftCoordinator,
        gate: Gate | None = None,
        telemetry: Telemetry = NULL_TELEMETRY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.coordinator = coordinator
        self.admission = Admission(gate, coordinator)  # gate None: no authentication (auth.enabled: false)
        self.telemetry = telemetry  # metrics and the access log (`coordinator.telemetry`)
        self._clock = clock

    # ---- admission -----------------------------------------------------------------------

    def authenticate(self, headers: Metadata) -> Caller:
        """The request's caller, once per request (the HTTP layer, before it reads the body);
        `Unauthenticated` unless the headers carry a valid key. Every method below takes it."""
        return self.admission.authenticate(headers)

    def _check_model(self, model: str) -> None:
        recipes = self.coordinator.recipe_table()
        if model not in recipes:
            raise ModelNotFound(
                f"the model {model!r} does not exist; models here are EFT recipes: {', '.join(sorted(recipes))} "
                "(GET /v1/models lists them)"
            )

    # ---- models --------------------------------------------------------------------------

    def _model_card(self, name: str) -> dict[str, Any]:
        recipe = self.coordinator.recipe_table()[name]
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": OWNED_BY,
            "description": recipe.description,
            "default": name == self.coordinator.default_recipe,
            "eft": recipe_card(recipe),  # as gRPC's ListRecipes: the playground builds its columns from it
        }

    def list_models(self, caller: Caller = ANONYMOUS) -> dict[str, Any]:
        self.admission.check(caller)
        return {"object": "list", "data": [self._model_card(name) for name in self.coordinator.recipe_table()]}

    def retrieve_model(self, model: str, caller: Caller = ANONYMOUS) -> dict[str, Any]:
        self.admission.check(caller)
        self._check_model(model)
        return self._model_card(model)

    # ---- requests ------------------------------------------------------------------------

    def _request(self, body: CommonBody, request_id: str, index: int, sample: int, **what: Any) -> GenerationRequest:
        """Choice `index` (its own sequence id) = sample `sample` of its prompt (seed + sample)."""
        return GenerationRequest(
            merge=MergeOptions(
                recipe=body.model,
                beta=body.beta,
                expert_weights=dict(body.expert_weights),
                conservative=body.conservative,
                conservative_top_p=body.conservative_top_p,
                logprob_top_k=body.logprob_top_k,
            ),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            # n independent samples: seed + i keeps each choice reproducible and distinct.
            seed=None if body.seed is None else body.seed + sample,
            stop=body.stop_strings(),
            ignore_eos=body.ignore_eos,
            timeout_s=body.timeout_s,
            return_model_logprobs=body.return_model_logprobs,
            request_id=f"{request_id}-{index}",
            speculative=SpeculativeOptions(
                enabled=body.speculative, max_draft_tokens=body.max_draft_tokens, adaptive=body.adaptive_draft
            ),
            **what,
        )

    async def _open(self, caller: Caller, body: CommonBody, choices: list[Choice], method: str) -> list[MeteredStream]:
        """One admitted coordinator stream per choice; on any failure every one opened so far is closed."""
        limit = caller.max_concurrent_streams
        if caller.key is not None and limit is not None and len(choices) > limit:  # never admissible: not a 429
            raise BadParam(
                f"{len(choices)} choices (n x prompts) are {len(choices)} streams at once, but key "
                f"{caller.key.id!r} may open {limit}; lower n or send fewer prompts",
                "n",
            )
        streams: list[MeteredStream] = []
        try:
            for c in choices:
                req = c.request
                prompt = req.prompt or "\n".join(f"{m.role}: {m.content}" for m in req.messages)
                trace = RequestTrace(self.telemetry, RequestRecord(method, req.request_id, body.model, prompt=prompt))
                admit = functools.partial(self.admission.admit, caller, body.model, body.logprob_top_k)
                build = lambda: req  # noqa: B023, E731 - called inside this await, within this iteration
                streams.append(await open_metered(self.coordinator, build, admit, trace))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        return streams

    async def completions(self, data: Any, caller: Caller = ANONYMOUS) -> dict[str, Any] | AsyncIterator[str]:
        """`POST /v1/completions`: the response object, or the SSE events when `stream` is true."""
        self.admission.check(caller)
        body = parse_body(CompletionBody, data)
        self._check_model(body.model)
        rid = "cmpl-" + secrets.token_hex(12)
        choices = [
            Choice(
                index=p * body.n + j,
                prompt_index=p,
                prompt_chars=len(prompt),
                request=self._request(
                    body,
                    rid,
                    p * body.n + j,
                    j,
                    prompt=prompt,
                    max_new_tokens=body.max_tokens,
                    return_logprobs=body.logprobs is not None,
                    top_logprobs=body.logprobs or 0,
                ),
            )
            for p, prompt in enumerate(body.prompts())
            for j in range(body.n)
        ]
        view = CompletionView(rid, int(self._clock()), body, choices)
        return await self._respond(caller, body, choices, view, "OpenAI.Completions")

    async def chat_completions(self, data: Any, caller: Caller = ANONYMOUS) -> dict[str, Any] | AsyncIterator[str]:
        """`POST /v1/chat/completions`: the response object, or the SSE events when `stream` is true."""
        self.admission.check(caller)
        body = parse_body(ChatCompletionBody, data)
        self._check_model(body.model)
        rid = "chatcmpl-" + secrets.token_hex(12)
        # OpenAI's "developer" role is its newer name for "system".
        messages = tuple(
            ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in body.messages
        )
        choices = [
            Choice(
                index=j,
                prompt_index=0,
                prompt_chars=0,
                request=self._request(
                    body,
                    rid,
                    j,
                    j,
                    prompt="",
                    messages=messages,
                    max_new_tokens=body.max_new_tokens(),
                    return_logprobs=body.logprobs,
                    top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
                ),
            )
            for j in range(body.n)
        ]
        view = ChatView(rid, int(self._clock()), body, choices)
        return await self._respond(caller, body, choices, view, "OpenAI.ChatCompletions")

    async def _respond(
        self, caller: Caller, body: CommonBody, choices: list[Choice], view: View, method: str
    ) -> dict[str, Any] | AsyncIterator[str]:
        streams = await self._open(caller, body, choices, method)
        merged = _merge(streams)
        if not body.stream:
            results = [Collected() for _ in choices]
            async with contextlib.aclosing(merged):
                async for i, chunk in merged:
                    results[i].add(chunk)
            return view.whole(results)
        # Wait for the first chunk before answering, so that a failure of the first step (a pool
        # down, the deadline) still gets its own HTTP status instead of a 200 with an error event.
        try:
            first = await anext(merged)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await merged.aclose()
            for s in streams:
                await s.aclose()
            raise
        return _events(view, merged, streams, first, body.include_usage())


async def _events(
    view: View,
    merged: AsyncGenerator[tuple[int, GenerationChunk], None],
    streams: list[MeteredStream],
    first: tuple[int, GenerationChunk] | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    results = [Collected() for _ in view.choices]
    try:
        for opening in view.opening():
            yield sse(opening)
        item = first
        while item is not None:
            i, chunk = item
            results[i].add(chunk)
            event = view.chunk(i, chunk, include_usage)
            if event is not None:
                yield sse(event)
            item = await anext(merged, None)
        if include_usage:
            yield sse(view.usage_chunk(results))
        yield DONE
    except Exception as e:  # noqa: BLE001 - after the 200 the status is sent as an error event
        yield sse(to_http_error(e).body)
        yield DONE
    finally:
        with contextlib.suppress(Exception):
            await merged.aclose()
        for s in streams:
            await s.aclose()
