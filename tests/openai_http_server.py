"""Shared by the OpenAI-compatible HTTP tests: a real uvicorn server over fake-engine pools on
loopback, the official client, raw HTTP, and the OpenAI error shape."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json

import openai
import uvicorn

from eft_serve.auth.gate import Gate
from eft_serve.coordinator.request import GenerationRequest, MergeOptions
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
