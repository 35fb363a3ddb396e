"""The request bodies of the OpenAI-compatible HTTP API, as strict pydantic models.

Owns which OpenAI parameters are accepted (and which values of the ones we cannot honour, e.g.
`echo: true`, penalties, `logit_bias`, are refused with the parameter named), the EFT knobs taken
as extra body fields (`beta`, `expert_weights`, `conservative`, `logprob_top_k`, `speculative`,
`max_draft_tokens`, `return_model_logprobs`, ...), and turning a pydantic `ValidationError` into an `InvalidArgument` that
names the offending field. Knows nothing of HTTP, Ray or the coordinator's limits (those are
checked by `coordinator.validate`, as for gRPC).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from eft_serve.errors import InvalidArgument

# `n` choices are n independent coordinator streams; more than this is refused up front.
MAX_CHOICES = 16
# OpenAI's own ranges: completions `logprobs` 0..5, chat `top_logprobs` 0..20.
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20


class BadParam(InvalidArgument):
    """An invalid request body: `param` names the field (OpenAI's `error.param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    # Unknown fields are refused (as OpenAI does: "Unrecognized request argument supplied"),
    # so a parameter we do not implement never silently changes nothing.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool = False  # accepted, ignored: nothing is obfuscated here


class CommonBody(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted for compatibility; not used
    # EFT knobs (extra body fields: `extra_body={...}` in the openai client).
    beta: float | None = None
    expert_weights: dict[str, float] = Field(default_factory=dict)
    conservative: bool = False
    conservative_top_p: float | None = None
    logprob_top_k: int | None = Field(None, ge=0)
    speculative: bool | None = None
    max_draft_tokens: int | None = Field(None, ge=1)
    adaptive_draft: bool | None = None
    top_k: int = Field(0, ge=0)  # sampling truncation of the merged distribution (vLLM's extra field)
    ignore_eos: bool = False
    timeout_s: float | None = Field(None, gt=0)
    # Each model's logprob of every generated token beside the merged one (needs logprobs).
    return_model_logprobs: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> CommonBody:
        if self.presence_penalty != 0.0:
            raise BadParam("presence_penalty is not supported; omit it or send 0", "presence_penalty")
        if self.frequency_penalty != 0.0:
            raise BadParam("frequency_penalty is not supported; omit it or send 0", "frequency_penalty")
        if self.logit_bias:
            raise BadParam("logit_bias is not supported; omit it", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise BadParam("stream_options is only allowed with stream: true", "stream_options")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(CommonBody):
    """`POST /v1/completions`."""

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            return v
        if isinstance(v, list) and v and all(isinstance(p, int | list) for p in v):
            raise ValueError("token-id prompts are not supported; send the prompt as text")
        raise ValueError("prompt must be a string or a non-empty list of strings")

    @model_validator(mode="after")
    def _completion_unsupported(self) -> CompletionBody:
        if self.echo:
            raise BadParam("echo: true is not supported; omit it or send false", "echo")
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise BadParam("best_of is not supported (only best_of = n); omit it", "best_of")
        if self.suffix:
            raise BadParam("suffix is not supported; omit it", "suffix")
        if self.return_model_logprobs and self.logprobs is None:
            raise BadParam("return_model_logprobs needs logprobs (e.g. logprobs: 0)", "return_model_logprobs")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessageBody(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted; not part of the rendered prompt

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionBody(CommonBody):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessageBody] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionBody:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadParam("top_logprobs needs logprobs: true", "top_logprobs")
        if self.return_model_logprobs and not self.logprobs:
            raise BadParam("return_model_logprobs needs logprobs: true", "return_model_logprobs")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


M = TypeVar("M", bound=BaseModel)


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


def parse_body(model: type[M], data: Any) -> M:
    """Validate a decoded JSON body; a bad one raises `BadParam` naming the (first) offending field."""
    if not isinstance(data, dict):
        raise BadParam(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _bad_param(e) from None


def _bad_param(e: ValidationError) -> BadParam:
    # (A validator's own `BadParam` is not a ValueError: pydantic lets it through unchanged.)
    errors = e.errors(include_url=False)
    parts = []
    for err in errors:
        loc = _loc(err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unrecognized request argument supplied: {loc}")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
    # Union types report one error per member: keep each message once.
    message = "; ".join(dict.fromkeys(parts))
    first = errors[0]["loc"] if errors else ()
    # The field itself (e.g. "prompt"), not the union member pydantic tried ("prompt.str").
    param = _loc(tuple(p for p in first if p not in ("str", "list[str]", "list[ContentPart]")))
    return BadParam(message, param or None)
