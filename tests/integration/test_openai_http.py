"""The OpenAI-compatible HTTP API over real HTTP on loopback (uvicorn, fake-engine pools): the
official `openai` client and raw HTTP see the same text as the coordinator itself, SSE framing,
OpenAI-style errors with their statuses, and the API keys / quotas of the gRPC door."""

from __future__ import annotations

import json
import math

import openai
import pytest
from openai_http_server import _assert_error_shape, _client, _direct_text, _http, _raw

from eft_serve.coordinator.request import GenerationRequest, MergeOptions


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
