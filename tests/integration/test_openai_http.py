"""The OpenAI-compatible HTTP API over real HTTP on loopback (uvicorn, fake-engine pools): the
official `openai` client and raw HTTP see the same text as the coordinator itself, SSE framing,
OpenAI-style errors with their statuses, and the API keys / quotas of the gRPC door."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math

import openai
import pytest
import uvicorn

from eft_serve.auth.gate import Gate
from eft_serve.auth.keys import add_key, load_key_store
from eft_serve.coordinator.request import GenerationRequest, MergeOptions
from eft_serve.coordinator.telemetry import NullTelemetry, RequestRecord
from eft_serve.errors import PermissionDenied, Unavailable
from eft_serve.infra.ports import free_port
from eft_serve.testing.fake_engine import FakeEngine
from eft_serve.transport.openai_api import OpenAIApi
from eft_serve.transport.openai_http import build_openai_app

from fakes import EOS, VOCAB, fake_coordinator, fake_engines


@contextlib.asynccontextmanager
async def _http(gate: Gate | None = None, delay_s: float = 0.0, large_base: FakeEngine | None = None):
    slow = large_base or FakeEngine(VOCAB, seed=1, name="large_base", eos_token_id=EOS, max_context=96, delay_s=delay_s)
    coord = fake_coordinator(fake_engines(large_base=slow), pool_call_retries=0)
    await coord.start()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_openai_app(OpenAIApi(coord, gate)), host="127.0.0.1", port=port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield {"port": port, "base_url": f"http://127.0.0.1:{port}/v1", "coordinator": coord}
    finally:
        server.should_exit = True
        await task
        await coord.stop()


def _client(base_url: str, key: str = "unused") -> openai.AsyncOpenAI:
    # No retries: a 429/503 must surface as itself, not be retried away.
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)


async def _direct_text(coord, prompt: str, max_new_tokens: int, **kw) -> tuple[str, str | None]:
    stream = await coord.generate(
        GenerationRequest(
            prompt=prompt, merge=MergeOptions(recipe="upscale"), temperature=0.0, max_new_tokens=max_new_tokens, **kw
        )
    )
    text, finish = [], None
    async for chunk in stream:
        text.append(chunk.text)
        finish = chunk.finish_reason or finish
    return "".join(text), finish


def _raw_blocking(port: int, method: str, path: str, body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp, resp.read()


async def _raw(port: int, method: str, path: str, body: bytes | None = None):
    """A plain HTTP/1.1 request (off the event loop, which runs the server), no client library."""
    return await asyncio.to_thread(_raw_blocking, port, method, path, body)


def _assert_error_shape(status: int, raw: bytes, expected: int, param: str | None = None) -> dict:
    assert status == expected, raw
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.fixture
async def server():
    async with _http() as s:
        yield s


async def test_models_and_unknown_model(server) -> None:
    client = _client(server["base_url"])
    models = await client.models.list()
    assert [m.id for m in models.data] == list(server["coordinator"].recipe_table())
    assert (await client.models.retrieve("upscale")).id == "upscale"
    with pytest.raises(openai.NotFoundError) as e:
        await client.completions.create(model="no-such-recipe", prompt="hello", max_tokens=2)
    assert e.value.code == "model_not_found" and "upscale" in e.value.message
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-recipe")


async def test_completion_text_is_the_coordinators(server) -> None:
    client = _client(server["base_url"])
    expected, finish = await _direct_text(server["coordinator"], "hello there", 12)
    whole = await client.completions.create(model="upscale", prompt="hello there", max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected and len(expected) == 12
    assert whole.choices[0].finish_reason == "length" == finish
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens == len("hello there")
    assert whole.usage.total_tokens == 12 + len("hello there")
    pieces, finishes, usage = [], [], None
    stream = await client.completions.create(
        model="upscale",
        prompt="hello there",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        pieces.append(chunk.choices[0].text)
        finishes.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert usage is not None and usage.completion_tokens == 12


async def test_chat_stream_and_whole_agree(server) -> None:
    client = _client(server["base_url"])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    whole = await client.chat.completions.create(model="upscale", messages=messages, max_tokens=8, temperature=0)
    content = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and content
    assert whole.usage.completion_tokens == 8
    stream = await client.chat.completions.create(
        model="upscale",
        messages=messages,
        max_completion_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    roles, text, finish, usage = [], [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        text.append(delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert roles[0] == "assistant"
    assert "".join(text) == content and finish == "length" and usage.completion_tokens == 8
    # The chat prompt is not the plain prompt: the coordinator renders the messages.
    plain = await client.completions.create(model="upscale", prompt="hi there", max_tokens=8, temperature=0)
    assert plain.usage.prompt_tokens != whole.usage.prompt_tokens


async def test_stop_seed_n_and_logprobs(server) -> None:
    client = _client(server["base_url"])
    expected, _ = await _direct_text(server["coordinator"], "abc", 12)
    cut = expected[4]
    stopped = await client.completions.create(model="upscale", prompt="abc", max_tokens=12, temperature=0, stop=[cut])
    assert stopped.choices[0].text == expected[: expected.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    # n choices are independent streams with seeds seed + i: each equals a single request with that seed.
    many = await client.completions.create(model="upscale", prompt="abc", max_tokens=10, temperature=1.0, seed=7, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    for i, choice in enumerate(many.choices):
        one = await client.completions.create(model="upscale", prompt="abc", max_tokens=10, temperature=1.0, seed=7 + i)
        assert choice.text == one.choices[0].text
    assert len({c.text for c in many.choices}) > 1
    assert many.usage.completion_tokens == 30 and many.usage.prompt_tokens == 3
    # Several prompts: choice p * n + j is sample j (seed + j) of prompt p.
    batch = await client.completions.create(
        model="upscale", prompt=["abc", "hello"], max_tokens=10, temperature=1.0, seed=7, n=2
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices[:2]] == [c.text for c in many.choices[:2]]
    one = await client.completions.create(model="upscale", prompt="hello", max_tokens=10, temperature=1.0, seed=8)
    assert batch.choices[3].text == one.choices[0].text
    assert batch.usage.prompt_tokens == len("abc") + len("hello")
    lp = await client.completions.create(model="upscale", prompt="abc", max_tokens=6, temperature=0, logprobs=2)
    logprobs = lp.choices[0].logprobs
    assert "".join(logprobs.tokens) == lp.choices[0].text == expected[:6]
    assert len(logprobs.token_logprobs) == 6 and all(x <= 0 for x in logprobs.token_logprobs)
    # logprobs = 2: the 2 most likely tokens, the sampled (greedy) one first.
    assert [list(d)[0] for d in logprobs.top_logprobs] == logprobs.tokens
    assert all(len(d) == 2 for d in logprobs.top_logprobs)
    assert logprobs.text_offset == [3 + i for i in range(6)]
    chat = await client.chat.completions.create(
        model="upscale",
        messages=[{"role": "user", "content": "abc"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)
    # EFT knobs as extra body fields reach the coordinator: beta = 0 is the large base alone.
    eft = await client.completions.create(
        model="upscale", prompt="abc", max_tokens=8, temperature=0, extra_body={"beta": 0.0, "logprob_top_k": 0}
    )
    base = await client.completions.create(
        model="large_base", prompt="abc", max_tokens=8, temperature=0, extra_body={"logprob_top_k": 0}
    )
    assert eft.choices[0].text == base.choices[0].text


async def test_top_logprobs_are_the_merged_alternatives(server) -> None:
    client = _client(server["base_url"])
    coord = server["coordinator"]
    # The coordinator's own alternatives for the same greedy request: what the door must show.
    stream = await coord.generate(
        GenerationRequest(
            prompt="abc", merge=MergeOptions(recipe="upscale"), temperature=0.0, max_new_tokens=8, top_logprobs=3
        )
    )
    direct = [t async for c in stream for t in c.tokens]
    expected = [[(a.text, a.logprob) for a in t.top_logprobs] for t in direct]
    assert all(len(e) == 3 for e in expected)

    done = await client.completions.create(model="upscale", prompt="abc", max_tokens=8, temperature=0, logprobs=3)
    lp = done.choices[0].logprobs
    assert len(lp.top_logprobs) == 8
    for token, token_lp, top, exp in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, expected):
        assert list(top) == [text for text, _ in exp]  # 3 alternatives, most likely first
        assert list(top.values()) == pytest.approx([x for _, x in exp], abs=1e-6)
        assert list(top)[0] == token and top[token] == pytest.approx(token_lp)  # greedy: sampled first
        assert sum(math.exp(x) for x in top.values()) <= 1 + 1e-6

    chat = await client.chat.completions.create(
        model="upscale",
        messages=[{"role": "user", "content": "abc"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 8
    for c in content:
        assert len(c.top_logprobs) == 3
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        lps = [t.logprob for t in c.top_logprobs]
        assert lps == sorted(lps, reverse=True) and len({t.token for t in c.top_logprobs}) == 3
        assert all(t.bytes == list(t.token.encode("utf-8")) for t in c.top_logprobs)
    # logprobs without top_logprobs: the sampled token's logprob and no alternatives (as OpenAI).
    bare = await client.chat.completions.create(
        model="upscale", messages=[{"role": "user", "content": "abc"}], max_tokens=3, temperature=0, logprobs=True
    )
    assert all(c.top_logprobs == [] for c in bare.choices[0].logprobs.content)

    # Streaming carries the same alternatives chunk by chunk (raw SSE).
    body = {"model": "upscale", "prompt": "abc", "max_tokens": 8, "temperature": 0, "logprobs": 3, "stream": True}
    resp, raw = await _raw(server["port"], "POST", "/v1/completions", json.dumps(body).encode())
    assert resp.status == 200
    events = [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: {")]
    streamed = [d for e in events for ch in e["choices"] if ch["logprobs"] for d in ch["logprobs"]["top_logprobs"]]
    assert [list(d.items()) for d in streamed] == [list(d.items()) for d in lp.top_logprobs]


async def test_bad_arguments_are_400_with_the_field(server) -> None:
    client = _client(server["base_url"])
    cases = [
        ({"temperature": -1}, "temperature"),
        ({"echo": True}, "echo"),
        ({"max_tokens": 100000}, "max_tokens"),  # over the coordinator's cap: its message, OpenAI's name
        ({"extra_body": {"beta": "strong"}}, "beta"),
        ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
    ]
    for kwargs, param in cases:
        extra = kwargs.pop("extra_body", None)
        with pytest.raises(openai.BadRequestError) as e:
            await client.completions.create(model="upscale", prompt="abc", extra_body=extra, **kwargs)
        assert "Traceback" not in e.value.message
        if param is not None:
            assert e.value.param == param, (kwargs, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="upscale", messages=[{"role": "tool", "content": "x"}])
    assert e.value.param.startswith("messages")
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="upscale", messages=[], max_tokens=2)
    assert e.value.param == "messages"
    # Raw HTTP: bad JSON, a non-object body, unknown routes: OpenAI's error shape every time.
    port = server["port"]
    resp, raw = await _raw(port, "POST", "/v1/completions", b"{not json")
    assert "not valid JSON" in _assert_error_shape(resp.status, raw, 400)["message"]
    # Python's JSON reader takes Infinity; the coordinator refuses a non-finite beta, by name.
    resp, raw = await _raw(port, "POST", "/v1/completions", b'{"model": "upscale", "prompt": "a", "beta": Infinity}')
    _assert_error_shape(resp.status, raw, 400, param="beta")
    resp, raw = await _raw(port, "POST", "/v1/chat/completions", b"[1, 2]")
    _assert_error_shape(resp.status, raw, 400)
    resp, raw = await _raw(port, "GET", "/v1/nothing-here")
    _assert_error_shape(resp.status, raw, 404)
    resp, raw = await _raw(port, "GET", "/v1/completions")
    _assert_error_shape(resp.status, raw, 405)


async def test_sse_framing_over_raw_http(server) -> None:
    body = json.dumps(
        {"model": "upscale", "prompt": "hello", "max_tokens": 5, "temperature": 0, "stream": True, "n": 2}
    ).encode()
    resp, raw = await _raw(server["port"], "POST", "/v1/completions", body)
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {p["object"] for p in payloads} == {"text_completion"} and len({p["id"] for p in payloads}) == 1
    by_index: dict[int, str] = {0: "", 1: ""}
    for p in payloads:
        (choice,) = p["choices"]
        by_index[choice["index"]] += choice["text"]
    expected, _ = await _direct_text(server["coordinator"], "hello", 5)
    assert by_index == {0: expected, 1: expected}  # greedy: both choices decode the same text


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
    store = load_key_store(path, None)
    lookups: list[str] = []
    real_lookup = store.lookup

    def counting_lookup(raw: str):
        lookups.append(raw)
        return real_lookup(raw)

    store.lookup = counting_lookup  # type: ignore[method-assign]
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
