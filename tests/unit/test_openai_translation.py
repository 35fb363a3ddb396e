"""The OpenAI translation layer without a server: request bodies (what is accepted, what is refused
and which field is named) and the error table (status, OpenAI error body, headers)."""

from __future__ import annotations

import pytest

from eft_serve.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from eft_serve.transport.openai_api import sse
from eft_serve.transport.openai_errors import ModelNotFound, to_http_error
from eft_serve.transport.openai_schema import BadParam, ChatCompletionBody, CompletionBody, parse_body


def _bad(model, data) -> BadParam:
    with pytest.raises(BadParam) as e:
        parse_body(model, data)
    return e.value


def test_completion_body_accepts_openai_and_eft_fields() -> None:
    body = parse_body(
        CompletionBody,
        {
            "model": "upscale",
            "prompt": ["a", "b"],
            "max_tokens": 4,
            "stop": "x",
            "n": 2,
            "seed": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": 0,
            "user": "someone",
            "beta": 1.5,
            "expert_weights": {"small_ft": 0.5},
            "conservative": True,
            "logprob_top_k": 0,
            "speculative": True,
            "max_draft_tokens": 4,
        },
    )
    assert body.prompts() == ["a", "b"] and body.stop_strings() == ("x",) and body.include_usage()
    assert parse_body(CompletionBody, {"model": "m", "prompt": "p", "stop": ["a", "b"]}).stop_strings() == ("a", "b")
    chat = parse_body(
        ChatCompletionBody,
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}
            ],
            "max_tokens": 3,
            "max_completion_tokens": 7,
        },
    )
    assert chat.max_new_tokens() == 7 and chat.messages[0].text() == "xy"


@pytest.mark.parametrize(
    ("data", "param", "words"),
    [
        ({"model": "m", "prompt": "p", "frobnicate": 1}, "frobnicate", "unrecognized request argument"),
        ({"model": "m"}, "prompt", "prompt"),
        ({"model": "m", "prompt": [1, 2, 3]}, "prompt", "token-id prompts"),
        ({"model": "m", "prompt": 7}, "prompt", "string or a non-empty list"),
        ({"model": "m", "prompt": "p", "echo": True}, "echo", "echo"),
        ({"model": "m", "prompt": "p", "best_of": 3}, "best_of", "best_of"),
        ({"model": "m", "prompt": "p", "suffix": "s"}, "suffix", "suffix"),
        ({"model": "m", "prompt": "p", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({"model": "m", "prompt": "p", "logit_bias": {"1": 2}}, "logit_bias", "not supported"),
        ({"model": "m", "prompt": "p", "n": 0}, "n", "greater than or equal to 1"),
        ({"model": "m", "prompt": "p", "n": 999}, "n", "less than or equal to 16"),
        ({"model": "m", "prompt": "p", "logprobs": 6}, "logprobs", "less than or equal to 5"),
        ({"model": "m", "prompt": "p", "stop": ["a", ""]}, "stop", "non-empty"),
        ({"model": "m", "prompt": "p", "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
        ({"model": "", "prompt": "p"}, "model", "at least 1 character"),
        ({"model": "m", "prompt": "p", "max_tokens": "many"}, "max_tokens", "integer"),
    ],
)
def test_completion_body_refusals_name_the_field(data, param, words) -> None:
    err = _bad(CompletionBody, data)
    assert err.param == param and words in err.message, (err.param, err.message)


def test_chat_body_refusals() -> None:
    assert _bad(ChatCompletionBody, {"model": "m", "messages": []}).param == "messages"
    err = _bad(ChatCompletionBody, {"model": "m", "messages": [{"role": "tool", "content": "x"}]})
    assert err.param == "messages.0.role"
    err = _bad(ChatCompletionBody, {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    assert err.param == "top_logprobs" and "logprobs: true" in err.message
    err = _bad(ChatCompletionBody, {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []})
    assert err.param == "tools"
    assert _bad(ChatCompletionBody, ["not", "an", "object"]).message.startswith("the request body must be")


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (InvalidArgument("x"), 400, "invalid_request_error"),
        (Unauthenticated("x"), 401, "authentication_error"),
        (PermissionDenied("x"), 403, "permission_error"),
        (NotFound("x"), 404, "not_found_error"),
        (ResourceExhausted("x"), 429, "rate_limit_error"),
        (Unavailable("x"), 503, "service_unavailable"),
        (DeadlineExceeded("x"), 504, "timeout_error"),
    ],
)
def test_error_table(exc, status, type_) -> None:
    err = to_http_error(exc)
    assert err.status == status and err.body["error"]["type"] == type_ and err.body["error"]["message"] == "x"
    assert set(err.body["error"]) == {"message", "type", "param", "code"}


def test_error_details() -> None:
    limited = to_http_error(RateLimited("slow down", retry_after_s=2.2))
    assert limited.status == 429 and limited.headers == {"Retry-After": "3"}
    assert limited.body["error"]["code"] == "rate_limit_exceeded"
    auth = to_http_error(Unauthenticated("no key"))
    assert auth.headers == {"WWW-Authenticate": "Bearer"} and auth.body["error"]["code"] == "invalid_api_key"
    missing = to_http_error(ModelNotFound("no such model"))
    assert missing.status == 404 and missing.body["error"]["param"] == "model"
    assert missing.body["error"]["code"] == "model_not_found"
    # The coordinator's own messages name its fields: OpenAI's names instead, as `param` too.
    cap = to_http_error(InvalidArgument("max_new_tokens 900 exceeds this server's cap of 512"))
    assert cap.body["error"]["param"] == "max_tokens"
    assert cap.body["error"]["message"] == "max_tokens 900 exceeds this server's cap of 512"
    assert to_http_error(BadParam("bad", "seed")).body["error"]["param"] == "seed"
    boom = to_http_error(RuntimeError("secret internals"))
    assert boom.status == 500 and "secret" not in boom.body["error"]["message"]
    assert "ref" in boom.body["error"]["message"]


def test_sse_framing() -> None:
    assert sse({"a": 1}) == 'data: {"a":1}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"
    with pytest.raises(ValueError):
        sse({"x": float("inf")})  # never invalid JSON on the wire
