"""The OpenAI-compatible HTTP API's keys, quotas, tracing and failures over real HTTP on loopback
(uvicorn, fake-engine pools): the same API keys and quotas as the gRPC door, one authentication
per request, one traced call per choice, pool failures as OpenAI-style errors."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import uvicorn
from openai_http_server import _assert_error_shape, _client, _http, _raw

from eft_serve.auth.gate import Gate
from eft_serve.auth.keys import add_key, load_key_store
from eft_serve.coordinator.telemetry import NullTelemetry, RequestRecord
from eft_serve.errors import PermissionDenied, Unavailable
from eft_serve.infra.ports import free_port
from eft_serve.testing.fake_engine import FakeEngine
from eft_serve.transport.openai_api import OpenAIApi
from eft_serve.transport.openai_http import build_openai_app

from fakes import EOS, VOCAB, counting_key_store, fake_coordinator


@pytest.fixture
async def secured(tmp_path):
    path = tmp_path / "keys.yaml"
    keys = {
        "one": add_key(path, "one", max_concurrent_streams=1),
        "narrow": add_key(path, "narrow", allowed_recipes=["large_base"]),
    }
    gate = Gate(load_key_store(path, None))
    async with _http(gate, delay_s=0.02) as s:
        yield {**s, "keys": keys}


async def test_api_keys_and_quotas(secured) -> None:
    base_url, port, keys = secured["base_url"], secured["port"], secured["keys"]
    resp, raw = await _raw(port, "GET", "/v1/models")
    err = _assert_error_shape(resp.status, raw, 401)
    assert "Bearer" in err["message"] and resp.getheader("www-authenticate") == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        await _client(base_url, "eft_wrong").models.list()
    with pytest.raises(openai.AuthenticationError):  # 401 comes before any complaint about the body
        await _client(base_url, "eft_wrong").completions.create(model="upscale", prompt="x", echo=True)
    assert [m.id for m in (await _client(base_url, keys["one"]).models.list()).data]
    with pytest.raises(openai.PermissionDeniedError) as e:
        await _client(base_url, keys["narrow"]).completions.create(model="upscale", prompt="abc", max_tokens=2)
    assert "large_base" in e.value.message
    ok = await _client(base_url, keys["narrow"]).completions.create(model="large_base", prompt="abc", max_tokens=2)
    assert ok.choices[0].text
    # One stream at a time for key "one": a second call while a stream is open is 429 with Retry-After.
    client = _client(base_url, keys["one"])
    stream = await client.completions.create(
        model="upscale", prompt="abc", max_tokens=60, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    first = await anext(aiter(stream))
    assert first.choices[0].text
    with pytest.raises(openai.RateLimitError) as e:
        await client.completions.create(model="upscale", prompt="abc", max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1
    # n = 2 needs two streams at once, more than this key may ever open: 400 naming n, not a 429.
    await stream.close()  # the client goes away mid-stream: the slot is released
    for _ in range(100):
        try:
            again = await client.completions.create(model="upscale", prompt="abc", max_tokens=2)
            break
        except openai.RateLimitError:
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("the concurrency slot was not released after the client disconnected")
    assert again.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model="upscale", prompt="abc", max_tokens=2, n=2)
    assert e.value.param == "n"
    # ... and nothing was left holding the slot.
    assert (await client.completions.create(model="upscale", prompt="abc", max_tokens=2)).choices[0].text


async def test_one_authentication_per_request(tmp_path) -> None:
    # Every key lookup is one authentication: each OpenAI request (n choices, streamed or whole,
    # listing included) looks its key up once, however many streams it opens.
    path = tmp_path / "keys.yaml"
    key = add_key(path, "many", max_concurrent_streams=8)
    store, lookups = counting_key_store(path)
    async with _http(Gate(store)) as s:
        client = _client(s["base_url"], key)
        calls = [
            lambda: client.models.list(),
            lambda: client.completions.create(model="upscale", prompt=["ab", "cd"], max_tokens=3, n=3),
            lambda: client.chat.completions.create(
                model="upscale", messages=[{"role": "user", "content": "a"}], max_tokens=2, n=2
            ),
        ]
        for call in calls:
            lookups.clear()
            await call()
            assert lookups == [key], lookups
        lookups.clear()
        stream = await client.completions.create(model="upscale", prompt="abc", max_tokens=4, n=2, stream=True)
        chunks = [c async for c in stream]
        assert len({c.choices[0].index for c in chunks if c.choices}) == 2
        assert lookups == [key], lookups


class _Recorder(NullTelemetry):
    def __init__(self) -> None:
        self.finished: list[tuple[str, str, str, int]] = []

    def request_finished(self, record: RequestRecord) -> None:
        self.finished.append((record.method, record.recipe, record.status, record.completion_tokens))


async def test_each_choice_is_one_traced_call(tmp_path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "narrow", allowed_recipes=["large_base"])
    recorder = _Recorder()
    coord = fake_coordinator()
    await coord.start()
    api = OpenAIApi(coord, Gate(load_key_store(path, None)), recorder)
    caller = api.authenticate([("authorization", f"Bearer {key}")])
    await api.completions({"model": "large_base", "prompt": "abc", "max_tokens": 3, "n": 2}, caller)
    await api.chat_completions(
        {"model": "large_base", "messages": [{"role": "user", "content": "a"}], "max_tokens": 2}, caller
    )
    with pytest.raises(PermissionDenied):
        await api.completions({"model": "upscale", "prompt": "abc"}, caller)
    events = await api.completions({"model": "large_base", "prompt": "abc", "max_tokens": 30, "stream": True}, caller)
    await anext(events)
    await events.aclose()  # the client went away mid-stream
    await coord.stop()
    assert recorder.finished == [
        ("OpenAI.Completions", "large_base", "OK", 3),
        ("OpenAI.Completions", "large_base", "OK", 3),
        ("OpenAI.ChatCompletions", "large_base", "OK", 2),
        ("OpenAI.Completions", "upscale", "PERMISSION_DENIED", 0),
        ("OpenAI.Completions", "large_base", "CANCELLED", 0),
    ]


class _FailingEngine(FakeEngine):
    """A large base whose pool goes down after `ok_calls` next-token calls."""

    def __init__(self, ok_calls: int) -> None:
        super().__init__(VOCAB, seed=1, name="large_base", eos_token_id=EOS, max_context=96)
        self.ok_calls = ok_calls

    def next_token_logprobs(self, queries, logprob_top_k):
        if self.num_calls >= self.ok_calls:
            raise Unavailable("model pool 'large_base' is down (test)")
        return super().next_token_logprobs(queries, logprob_top_k)


async def test_pool_failure_before_and_after_the_first_token() -> None:
    body = {"model": "upscale", "prompt": "abc", "max_tokens": 20, "temperature": 0, "stream": True}
    # The first step fails: the stream has not started, so the status is the error's own (503).
    async with _http(large_base=_FailingEngine(ok_calls=0)) as s:
        resp, raw = await _raw(s["port"], "POST", "/v1/completions", json.dumps(body).encode())
        assert "large_base" in _assert_error_shape(resp.status, raw, 503)["message"]
        with pytest.raises(openai.InternalServerError) as e:
            await _client(s["base_url"]).completions.create(model="upscale", prompt="abc", max_tokens=3)
        assert e.value.status_code == 503
    # A later step fails: 200 and some text, then an error event, then [DONE].
    async with _http(large_base=_FailingEngine(ok_calls=4)) as s:
        resp, raw = await _raw(s["port"], "POST", "/v1/completions", json.dumps(body).encode())
        assert resp.status == 200
        events = [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "service_unavailable" and "large_base" in error["message"]
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])


async def test_routes_off() -> None:
    # http.openai: false: the coordinator mounts an app without routes; every path says why.
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_openai_app(None), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        resp, raw = await _raw(port, "GET", "/v1/models")
        assert "http.openai: false" in _assert_error_shape(resp.status, raw, 404)["message"]
    finally:
        server.should_exit = True
        await task
