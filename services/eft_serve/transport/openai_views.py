"""The OpenAI response shapes of one request: whole responses, streamed chunks and their usage.

Owns how the coordinator's chunks look to an OpenAI client: completions' `text` / `logprobs`
(`{text: logprob}` dicts, the sampled token added when it is not among the N asked for, so up to
N + 1 entries; `text_offset` counted from the start of the prompt) and chat's `message` / `delta`
with `content[].top_logprobs` lists of `{token, logprob, bytes}` (with `return_model_logprobs`, each
model's logprobs and own top alternatives beside them, in the same shapes); finish reasons in OpenAI's
words; usage (each prompt counted once, not once per choice) with the EFT extras (recipe, top-k,
seeds, per-choice timing); and the SSE framing (`data: {...}`, `data: [DONE]`). Knows nothing of
admission or of how the chunks are produced (`openai_api`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from eft_serve.coordinator.request import GenerationChunk, GenerationRequest, TokenOutput, TopLogprob, Usage
from eft_serve.transport.openai_extras import choice_stats, model_logprobs
from eft_serve.transport.openai_extras import json_logprob as _lp
from eft_serve.transport.openai_schema import ChatCompletionBody, CommonBody, CompletionBody

FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", None: None}


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


def _top_dict(alts: list[TopLogprob]) -> dict[str, float]:
    out: dict[str, float] = {}
    for a in alts:
        out.setdefault(a.text, _lp(a.logprob))  # two tokens with one text: the likelier one keeps it
    return out


def _chat_entry(text: str, logprob: float | None) -> dict[str, Any]:
    # `bytes` are the UTF-8 of the decoded text (part of a multi-byte character decodes to U+FFFD).
    return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8"))}


@dataclass
class Choice:
    index: int
    prompt_index: int
    request: GenerationRequest
    prompt_chars: int  # completions `text_offset` counts from the start of the prompt


@dataclass
class Collected:
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


class View:
    """The OpenAI shapes of one request's responses (whole, and streamed chunks)."""

    object_whole = ""
    object_chunk = ""

    def __init__(self, rid: str, created: int, body: CommonBody, choices: list[Choice]) -> None:
        self.rid = rid
        self.created = created
        self.body = body
        self.choices = choices

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.body.model}

    def usage(self, results: list[Collected]) -> dict[str, Any]:
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

    def whole(self, results: list[Collected]) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, index: int, chunk: GenerationChunk, include_usage: bool) -> dict[str, Any] | None:
        raise NotImplementedError

    def usage_chunk(self, results: list[Collected]) -> dict[str, Any]:
        return {**self._head(self.object_chunk), "choices": [], "usage": self.usage(results)}

    def _chunk(self, choice: dict[str, Any], include_usage: bool) -> dict[str, Any]:
        out = {**self._head(self.object_chunk), "choices": [choice]}
        if include_usage:
            out["usage"] = None  # OpenAI: every chunk but the last has usage null
        return out


class CompletionView(View):
    object_whole = "text_completion"
    object_chunk = "text_completion"

    def _logprobs(self, choice: Choice, tokens: list[TokenOutput], offset: int) -> dict[str, Any] | None:
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
            if body.logprobs:  # ... and each model's own top alternatives, `{role: {text: logprob}}`
                out["model_top_logprobs"] = [
                    {role: _top_dict(alts) for role, alts in t.model_top_logprobs.items()} for t in tokens
                ]
        return out

    def whole(self, results: list[Collected]) -> dict[str, Any]:
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

    def __init__(self, rid: str, created: int, body: CommonBody, choices: list[Choice]) -> None:
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


class ChatView(View):
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
                if body.top_logprobs:  # ... and each model's own top alternatives
                    entry["model_top_logprobs"] = {
                        role: [_chat_entry(a.text, a.logprob) for a in alts]
                        for role, alts in t.model_top_logprobs.items()
                    }
        return {"content": content, "refusal": None}

    def whole(self, results: list[Collected]) -> dict[str, Any]:
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
