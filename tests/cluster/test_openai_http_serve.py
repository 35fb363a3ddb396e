"""The OpenAI-compatible API through Serve's HTTP proxy on the real local Ray cluster: the same
coordinator replicas as gRPC (one decode loop: the same greedy text through both doors), the
official `openai` client streaming and not, and raw HTTP for SSE framing and the error shape."""

from __future__ import annotations

import http.client
import json

import openai
import pytest

from eft_serve.client import EftClient

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def http_port(cluster_stack) -> int:
    return cluster_stack["config"].http.port


@pytest.fixture(scope="module")
def client(http_port) -> openai.OpenAI:
    # auth is off in the cluster stack; the client insists on some key string.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=120)


def _raw(port: int, method: str, path: str, body: dict | bytes | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp, resp.read()


def test_http_text_equals_grpc_text(cluster_stack, client) -> None:
    question = cluster_stack["family"].world.held_out_questions()[0].prompt
    with EftClient(cluster_stack["address"], timeout=120) as grpc_client:
        grpc_reply = grpc_client.complete(question, temperature=0, max_new_tokens=24, recipe="upscale")
    whole = client.completions.create(model="upscale", prompt=question, max_tokens=24, temperature=0)
    assert whole.choices[0].text == grpc_reply.text and grpc_reply.text
    assert whole.usage.completion_tokens == len(grpc_reply.token_ids)
    assert whole.usage.prompt_tokens == grpc_reply.usage.prompt_tokens
    stream = client.completions.create(
        model="upscale",
        prompt=question,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        pieces.extend(c.text for c in chunk.choices)
    assert "".join(pieces) == grpc_reply.text
    assert usage is not None and usage.completion_tokens == len(grpc_reply.token_ids)


def test_models_chat_and_errors(cluster_stack, client, http_port) -> None:
    recipes = set(cluster_stack["config"].recipes)
    assert {m.id for m in client.models.list().data} == recipes
    messages = [{"role": "user", "content": "What is the river of Vorlék?"}]
    whole = client.chat.completions.create(model="upscale", messages=messages, max_tokens=16, temperature=0)
    content = whole.choices[0].message.content
    assert content and whole.choices[0].finish_reason in ("stop", "length")
    streamed = client.chat.completions.create(
        model="upscale", messages=messages, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == content
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-recipe", prompt="Q: hi\nA:", max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="upscale", prompt="Q: hi\nA:", max_tokens=2, top_p=1.5)
    assert e.value.param == "top_p"
    # Raw HTTP through the proxy: SSE framing, and the error body's shape with its status.
    resp, raw = _raw(
        http_port,
        "POST",
        "/v1/chat/completions",
        {"model": "upscale", "messages": messages, "max_tokens": 6, "temperature": 0, "stream": True},
    )
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    resp, raw = _raw(http_port, "POST", "/v1/completions", b"{oops")
    body = json.loads(raw)
    assert resp.status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    # gRPC still reaches the same deployment's methods next to the HTTP routes.
    with EftClient(cluster_stack["address"], timeout=60) as grpc_client:
        assert {r.name for r in grpc_client.list_recipes().recipes} == recipes
