"""The OpenAI-compatible API over an `EftCoordinator`: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Owns the translation of OpenAI request bodies into coordinator `GenerationRequest`s (the `model`
is a recipe name; `n` choices are n independent coordinator streams with seeds seed + i; chat
`messages` go to the coordinator as `ChatMessage`s, which renders each pool's prompt), of the
coordinator's chunks into OpenAI responses (whole, or SSE `data: {...}` events ending in
`data: [DONE]`), and admission through the same `Gate` as gRPC (`Authorization: Bearer <key>`,
one quota lease per choice, tokens charged as they stream); each choice is one call for the
telemetry (metrics, access log; methods `OpenAI.Completions` / `OpenAI.ChatCompletions`). One
decode loop: the coordinator's.

Logprobs are the merged (EFT) distribution's: completions `logprobs: N` and chat `top_logprobs: N`
become the coordinator's `top_logprobs = N` (the N most likely tokens at each step, from the merged
support: in top-k mode the union of the models' top-k, the distribution sampled from). Completions
get OpenAI's `{text: logprob}` dicts (the sampled token added when it is not among the N, so up
to N + 1 entries); chat gets `content[].top_logprobs` lists of `{token, logprob, bytes}`.

Raises `EftError`s (`BadParam` for a bad body); the HTTP layer maps them with `openai_errors`.
Knows nothing of HTTP frameworks or Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from eft_serve.auth.gate import Gate, Metadata
from eft_serve.auth.quotas import NO_LIMIT, Lease
from eft_serve.coordinator.request import (
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    MergeOptions,
    SpeculativeOptions,
    TokenOutput,
    Usage,
)
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.coordinator.telemetry import NULL_TELEMETRY, RequestRecord, RequestTrace, Telemetry
from eft_serve.transport.metered_stream import MeteredStream, open_metered
from eft_serve.transport.openai_errors import ModelNotFound, to_http_error
from eft_serve.transport.openai_extras import choice_stats, model_logprobs, recipe_card
from eft_serve.transport.openai_extras import json_logprob as _lp
from eft_serve.transport.openai_schema import BadParam, ChatCompletionBody, CommonBody, CompletionBody, parse_body

# The coordinator's finish reasons -> OpenAI's ("eos" is a natural stop; the context limit is a length cut).
FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", None: None}
OWNED_BY = "eft-serve"


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"data: {payload}\n\n"


DONE = sse("[DONE]")


def _completion_top(t: TokenOutput) -> dict[str, float]:
    """OpenAI completions' `top_logprobs` entry of one token: the asked-for most likely tokens, plus
    the sampled one when it is not among them (OpenAI: up to logprobs + 1), keyed by text."""
    out: dict[str, float] = {}
    for a in t.top_logprobs:
        out.setdefault(a.text, _lp(a.logprob))  # two tokens with one text: the likelier one keeps it
    if all(a.token_id != t.token_id for a in t.top_logprobs):
        out.setdefault(t.text, _lp(t.logprob))
    return out


def _chat_entry(text: str, logprob: float | None) -> dict[str, Any]:
    # `bytes` are the UTF-8 of the decoded text (part of a multi-byte character decodes to U+FFFD).
    return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8"))}


@dataclass
class _Choice:
    index: int
    prompt_index: int
    request: GenerationRequest
    prompt_chars: int  # completions `text_offset` counts from the start of the prompt


@dataclass
class _Collected:
    """What one choice produced (whole responses, and the usage of streamed ones)."""

    text: list[str] = field(default_factory=list)
    tokens: list[TokenOutput] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.text.append(chunk.text)
        self.tokens.extend(chunk.tokens)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage


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
        self.gate = gate  # None: no authentication (auth.enabled: false)
        self.telemetry = telemetry  # metrics and the access log (`coordinator.telemetry`)
        self._clock = clock

    # ---- admission -----------------------------------------------------------------------

    def authenticate(self, headers: Metadata) -> None:
        """Raise `Unauthenticated` unless the headers carry a valid key (no-op without auth)."""
        if self.gate is not None:
            self.gate.authenticate(headers)

    async def _admit(self, headers: Metadata, body: CommonBody) -> Lease:
        if self.gate is None:
            return NO_LIMIT
        top_k = body.logprob_top_k if body.logprob_top_k is not None else self.coordinator.default_logprob_top_k
        return await self.gate.admit(headers, body.model, exact=top_k == 0)

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

    def list_models(self, headers: Metadata = ()) -> dict[str, Any]:
        self.authenticate(headers)
        return {"object": "list", "data": [self._model_card(name) for name in self.coordinator.recipe_table()]}

    def retrieve_model(self, model: str, headers: Metadata = ()) -> dict[str, Any]:
        self.authenticate(headers)
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

    async def _open(
        self, headers: Metadata, body: CommonBody, choices: list[_Choice], method: str
    ) -> list[MeteredStream]:
        """One admitted coordinator stream per choice; on any failure every one opened so far is closed."""
        if self.gate is not None:
            key = self.gate.authenticate(headers)
            limit = key.max_concurrent_streams
            if limit is not None and len(choices) > limit:  # could never be admitted: not a 429
                raise BadParam(
                    f"{len(choices)} choices (n x prompts) are {len(choices)} streams at once, but key "
                    f"{key.id!r} may open {limit}; lower n or send fewer prompts",
                    "n",
                )
        streams: list[MeteredStream] = []
        try:
            for c in choices:
                req = c.request
                prompt = req.prompt or "\n".join(f"{m.role}: {m.content}" for m in req.messages)
                trace = RequestTrace(self.telemetry, RequestRecord(method, req.request_id, body.model, prompt=prompt))
                admit = functools.partial(self._admit, headers, body)
                build = lambda: req  # noqa: B023, E731 - called inside this await, within this iteration
                streams.append(await open_metered(self.coordinator, build, admit, trace))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        return streams

    async def completions(self, data: Any, headers: Metadata = ()) -> dict[str, Any] | AsyncIterator[str]:
        """`POST /v1/completions`: the response object, or the SSE events when `stream` is true."""
        self.authenticate(headers)
        body = parse_body(CompletionBody, data)
        self._check_model(body.model)
        rid = "cmpl-" + secrets.token_hex(12)
        choices = [
            _Choice(
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
        view = _CompletionView(rid, int(self._clock()), body, choices)
        return await self._respond(headers, body, choices, view, "OpenAI.Completions")

    async def chat_completions(self, data: Any, headers: Metadata = ()) -> dict[str, Any] | AsyncIterator[str]:
        """`POST /v1/chat/completions`: the response object, or the SSE events when `stream` is true."""
        self.authenticate(headers)
        body = parse_body(ChatCompletionBody, data)
        self._check_model(body.model)
        rid = "chatcmpl-" + secrets.token_hex(12)
        # OpenAI's "developer" role is its newer name for "system".
        messages = tuple(
            ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in body.messages
        )
        choices = [
            _Choice(
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
        view = _ChatView(rid, int(self._clock()), body, choices)
        return await self._respond(headers, body, choices, view, "OpenAI.ChatCompletions")

    async def _respond(
        self, headers: Metadata, body: CommonBody, choices: list[_Choice], view: _View, method: str
    ) -> dict[str, Any] | AsyncIterator[str]:
        streams = await self._open(headers, body, choices, method)
        merged = _merge(streams)
        if not body.stream:
            results = [_Collected() for _ in choices]
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
    view: _View,
    merged: AsyncGenerator[tuple[int, GenerationChunk], None],
    streams: list[MeteredStream],
    first: tuple[int, GenerationChunk] | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    results = [_Collected() for _ in view.choices]
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


# ---- response shapes --------------------------------------------------------------------


class _View:
    """The OpenAI shapes of one request's responses (whole, and streamed chunks)."""

    object_whole = ""
    object_chunk = ""

    def __init__(self, rid: str, created: int, body: CommonBody, choices: list[_Choice]) -> None:
        self.rid = rid
        self.created = created
        self.body = body
        self.choices = choices

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.body.model}

    def usage(self, results: list[_Collected]) -> dict[str, Any]:
        prompt: dict[int, int] = {}  # the prompt is counted once per prompt, not once per choice
        completion = 0
        seeds: list[int] = []
        stats: list[dict[str, float]] = []
        first: Usage | None = None
        for c, r in zip(self.choices, results):
            u = r.usage
            if u is None:
                continue
            first = first or u
            prompt[c.prompt_index] = u.prompt_tokens
            completion += u.completion_tokens
            seeds.append(u.seed)
            stats.append(choice_stats(u))
        prompt_tokens = sum(prompt.values())
        out: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        if first is not None:  # EFT extras: what the server chose (seeds reproduce the choices)
            eft = {"recipe": first.recipe, "logprob_top_k": first.logprob_top_k, "seeds": seeds}
            out["eft"] = {**eft, "choices": stats}  # choices: timing and speculation per choice
        return out

    def opening(self) -> list[dict[str, Any]]:
        return []

    def whole(self, results: list[_Collected]) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, index: int, chunk: GenerationChunk, include_usage: bool) -> dict[str, Any] | None:
        raise NotImplementedError

    def usage_chunk(self, results: list[_Collected]) -> dict[str, Any]:
        return {**self._head(self.object_chunk), "choices": [], "usage": self.usage(results)}

    def _chunk(self, choice: dict[str, Any], include_usage: bool) -> dict[str, Any]:
        out = {**self._head(self.object_chunk), "choices": [choice]}
        if include_usage:
            out["usage"] = None  # OpenAI: every chunk but the last has usage null
        return out


class _CompletionView(_View):
    object_whole = "text_completion"
    object_chunk = "text_completion"

    def _logprobs(self, choice: _Choice, tokens: list[TokenOutput], offset: int) -> dict[str, Any] | None:
        body = self.body
        if not isinstance(body, CompletionBody) or body.logprobs is None:
            return None
        offsets = []
        pos = choice.prompt_chars + offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t.text)
        out: dict[str, Any] = {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [_lp(t.logprob) for t in tokens],
            "top_logprobs": [_completion_top(t) for t in tokens],
            "text_offset": offsets,
        }
        if body.return_model_logprobs:  # EFT extra: each model's logprob of each token
            out["model_logprobs"] = [model_logprobs(t) for t in tokens]
        return out

    def whole(self, results: list[_Collected]) -> dict[str, Any]:
        return {
            **self._head(self.object_whole),
            "choices": [
                {
                    "index": c.index,
                    "text": "".join(r.text),
                    "logprobs": self._logprobs(c, r.tokens, 0),
                    "finish_reason": FINISH_REASON[r.finish_reason],
                }
                for c, r in zip(self.choices, results)
            ],
            "usage": self.usage(results),
        }

    def __init__(self, rid: str, created: int, body: CommonBody, choices: list[_Choice]) -> None:
        super().__init__(rid, created, body, choices)
        self._offsets = [0] * len(choices)

    def chunk(self, index: int, chunk: GenerationChunk, include_usage: bool) -> dict[str, Any] | None:
        choice = self.choices[index]
        logprobs = self._logprobs(choice, chunk.tokens, self._offsets[index])
        self._offsets[index] += sum(len(t.text) for t in chunk.tokens)
        if not chunk.text and chunk.finish_reason is None and not (logprobs and chunk.tokens):
            return None  # e.g. half a UTF-8 character: nothing to say yet
        return self._chunk(
            {
                "index": choice.index,
                "text": chunk.text,
                "logprobs": logprobs,
                "finish_reason": FINISH_REASON[chunk.finish_reason],
            },
            include_usage,
        )


class _ChatView(_View):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def _logprobs(self, tokens: list[TokenOutput]) -> dict[str, Any] | None:
        body = self.body
        if not isinstance(body, ChatCompletionBody) or not body.logprobs:
            return None
        content = [
            {**_chat_entry(t.text, t.logprob), "top_logprobs": [_chat_entry(a.text, a.logprob) for a in t.top_logprobs]}
            for t in tokens
        ]
        if body.return_model_logprobs:  # EFT extra: each model's logprob of each token
            for entry, t in zip(content, tokens):
                entry["model_logprobs"] = model_logprobs(t)
        return {"content": content, "refusal": None}

    def whole(self, results: list[_Collected]) -> dict[str, Any]:
        return {
            **self._head(self.object_whole),
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": "".join(r.text), "refusal": None},
                    "logprobs": self._logprobs(r.tokens),
                    "finish_reason": FINISH_REASON[r.finish_reason],
                }
                for c, r in zip(self.choices, results)
            ],
            "usage": self.usage(results),
        }

    def opening(self) -> list[dict[str, Any]]:
        # OpenAI opens each choice with the role and empty content.
        include_usage = self.body.include_usage()
        return [
            self._chunk(
                {
                    "index": c.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                },
                include_usage,
            )
            for c in self.choices
        ]

    def chunk(self, index: int, chunk: GenerationChunk, include_usage: bool) -> dict[str, Any] | None:
        logprobs = self._logprobs(chunk.tokens)
        if not chunk.text and chunk.finish_reason is None and not (logprobs and chunk.tokens):
            return None
        delta = {"content": chunk.text} if chunk.text else {}
        return self._chunk(
            {
                "index": self.choices[index].index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": FINISH_REASON[chunk.finish_reason],
            },
            include_usage,
        )
