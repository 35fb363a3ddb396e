"""The playground page and the OpenAI extras it reads, over real HTTP on loopback (uvicorn, a real
coordinator and API-key gate over fake-engine pools), and the page itself in headless Chromium:
a missing or wrong key shows the 401 message, a good key streams every column, the up-scaled
tokens carry the attribution the API's per-model logprobs give, and bad input shows the API's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re

import numpy as np
import pytest
import uvicorn
from playground_browser import start_chrome, wait_for

from eft_serve.auth.gate import Gate
from eft_serve.auth.keys import add_key, load_key_store
from eft_serve.config import CoordinatorConfig, RecipeConfig
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.infra.ports import free_port
from eft_serve.transport.inprocess import InProcessPool
from eft_serve.transport.openai_api import OpenAIApi
from eft_serve.transport.openai_http import build_openai_app
from eft_serve.transport.openai_schema import BadParam

from fakes import RECIPES, CharTokenizer, fake_engines

# The fakes' recipes plus one single-model recipe per role: the page's columns.
PLAYGROUND_RECIPES = {
    **RECIPES,
    "small_ft": RecipeConfig(description="the small fine-tune alone", base="small_ft"),
    "small_base": RecipeConfig(description="the small base alone", base="small_base"),
    "small_ft_b": RecipeConfig(base="small_ft_b"),
}


def _coordinator() -> tuple[EftCoordinator, dict]:
    engines = fake_engines()
    pools = {role: InProcessPool(e, role) for role, e in engines.items()}
    config = CoordinatorConfig(max_new_tokens_cap=64, default_max_new_tokens=16, pool_call_retries=0)
    return EftCoordinator(pools, PLAYGROUND_RECIPES, CharTokenizer(), config), engines


@contextlib.asynccontextmanager
async def _http(gate: Gate | None):
    coord, engines = _coordinator()
    await coord.start()
    port = free_port()
    app = build_openai_app(OpenAIApi(coord, gate))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield {"port": port, "url": f"http://127.0.0.1:{port}", "coordinator": coord, "engines": engines}
    finally:
        server.should_exit = True
        await task
        await coord.stop()


def _get(port: int, path: str, body: dict | None = None, key: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request("POST" if body is not None else "GET", path, body=json.dumps(body) if body else None, headers=headers)
    resp = conn.getresponse()
    return resp, resp.read()


async def test_the_page_is_served_from_the_package_only() -> None:
    async with _http(None) as s:
        resp, html = await asyncio.to_thread(_get, s["port"], "/playground")
        assert resp.status == 200 and resp.getheader("content-type").startswith("text/html")
        csp = resp.getheader("content-security-policy")
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
        assets = re.findall(rb'(?:src|href)="([^"]+)"', html)
        files = [b"/playground/api.js", b"/playground/tokens.js", b"/playground/playground.js"]
        assert assets == [b"data:,", b"/playground/playground.css", *files]  # scripts in load order
        for path in assets[1:]:
            kind = "text/css" if path.endswith(b".css") else "text/javascript"
            r, data = await asyncio.to_thread(_get, s["port"], path.decode())
            assert r.status == 200 and r.getheader("content-type").startswith(kind) and data
            # Offline machine, and no third party sees a prompt or a key: nothing loads from elsewhere.
            assert not re.search(rb"https?://", data), path
        assert not re.search(rb"https?://", html)
        r, _ = await asyncio.to_thread(_get, s["port"], "/playground/")
        assert r.status == 308 and r.getheader("location") == "/playground"
        r, raw = await asyncio.to_thread(_get, s["port"], "/playground/../pyproject.toml")
        assert r.status == 404 and json.loads(raw)["error"]["message"]
        r, raw = await asyncio.to_thread(_get, s["port"], "/playground/routes.py")
        assert r.status == 404
    # `http.openai: false`: no routes, so no page either.
    app = build_openai_app(None)
    assert not [r for r in app.routes if getattr(r, "path", "").startswith("/playground")]


async def test_model_logprobs_are_each_models_and_usage_has_timing() -> None:
    coord, engines = _coordinator()
    await coord.start()
    api = OpenAIApi(coord)
    tok = CharTokenizer()
    try:
        cards = {m["id"]: m["eft"] for m in api.list_models()["data"]}
        assert cards["upscale"] == {
            "base": "large_base",
            "experts": ["small_ft"],
            "reference": "small_base",
            "default_weights": {},
        }
        assert cards["interpolate"]["default_weights"] == {"small_ft": 1.0, "small_ft_b": 0.0}
        assert cards["small_ft"]["experts"] == []
        beta, prompt = 1.5, "hello there"
        body = {
            "model": "upscale",
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "beta": beta,
            "logprob_top_k": 0,
            "logprobs": 2,
            "return_model_logprobs": True,
        }
        out = await api.completions(body)
        lp = out["choices"][0]["logprobs"]
        ids = tok.encode(prompt)
        for i, text in enumerate(lp["tokens"]):
            token = tok.encode(text)[0]
            prefix = ids + [tok.encode(t)[0] for t in lp["tokens"][:i]]
            want = {
                role: float(engines[role].logprobs(prefix)[token]) for role in ("large_base", "small_ft", "small_base")
            }
            assert lp["model_logprobs"][i] == pytest.approx(want, abs=1e-4)
            # ... and the merged logprob is the EFT one: softmax(log p_lb + β·(log p_ft − log p_sb)).
            score = engines["large_base"].logprobs(prefix) + beta * (
                engines["small_ft"].logprobs(prefix) - engines["small_base"].logprobs(prefix)
            )
            merged = score[token] - np.log(np.exp(score - score.max()).sum()) - score.max()
            assert lp["token_logprobs"][i] == pytest.approx(float(merged), abs=1e-4)
        stats = out["usage"]["eft"]["choices"]
        assert len(stats) == 1 and stats[0]["time_to_first_token_ms"] > 0 and stats[0]["tokens_per_s"] > 0
        assert stats[0]["speculative_blocks"] == 0
        # Without the flag the field is absent (plain OpenAI shape).
        plain = await api.completions({**body, "return_model_logprobs": False})
        assert "model_logprobs" not in plain["choices"][0]["logprobs"]
        assert plain["choices"][0]["text"] == out["choices"][0]["text"]
        # Speculative: the drafted / accepted counts come back per choice.
        spec = await api.completions({**body, "speculative": True, "max_draft_tokens": 4, "logprob_top_k": 8})
        s = spec["usage"]["eft"]["choices"][0]
        assert s["speculative_blocks"] > 0 and 0 <= s["accepted_tokens"] <= s["drafted_tokens"]
        # Chat: each content entry carries its models' logprobs.
        chat = await api.chat_completions(
            {
                "model": "upscale",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "logprobs": True,
                "top_logprobs": 3,
                "return_model_logprobs": True,
            }
        )
        entries = chat["choices"][0]["logprobs"]["content"]
        assert entries and all(set(e["model_logprobs"]) == {"large_base", "small_ft", "small_base"} for e in entries)
        # The flag needs logprobs: refused with the parameter named.
        with pytest.raises(BadParam) as e:
            await api.completions({"model": "upscale", "prompt": "x", "return_model_logprobs": True})
        assert e.value.param == "return_model_logprobs" and "logprobs" in str(e.value)
        with pytest.raises(BadParam) as e:
            await api.chat_completions(
                {"model": "upscale", "messages": [{"role": "user", "content": "x"}], "return_model_logprobs": True}
            )
        assert e.value.param == "return_model_logprobs"
    finally:
        await coord.stop()


def _run_and_wait(d, n: int = 4) -> list:
    """Click Run and wait for this run's `n` finished columns (not the previous run's)."""
    from selenium.webdriver.common.by import By

    old = d.find_elements(By.CSS_SELECTOR, "#columns .pane")
    d.find_element(By.ID, "run").click()

    def fresh() -> list | None:
        panes = d.find_elements(By.CSS_SELECTOR, "#columns .pane")
        if any(p.id == o.id for p in panes for o in old):
            return None
        done = [p for p in panes if "finished" in p.get_attribute("class")]
        return panes if len(panes) == n == len(done) else None

    return wait_for(fresh, 60, f"{n} finished columns")


def _browse_with_keys(url: str, key: str, profile, shot) -> dict:
    """The page in Chromium (blocking: runs off the server's event loop)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = start_chrome(profile)
    try:
        d.get(url + "/playground")
        err = d.find_element(By.ID, "error")
        # No key on an auth server: the 401 message, saying what to send.
        wait_for(lambda: err.is_displayed() and "401" in err.text, 30, "the 401 message")
        assert "Bearer" in err.text and "enter a valid API key" in err.text
        d.find_element(By.ID, "key").send_keys("eft_not_a_key")
        d.find_element(By.ID, "run").click()  # not connected yet: Run lists the recipes first
        wait_for(lambda: "unknown API key" in err.text, 30, "the wrong key's 401 message")
        assert "401 Unauthorized" in err.text
        key_field = d.find_element(By.ID, "key")
        key_field.clear()
        key_field.send_keys(key + "\n")  # Enter connects
        wait_for(lambda: not err.is_displayed(), 30, "the error to clear")
        options = [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#recipe option")]
        assert sorted(options) == ["interpolate", "upscale"]  # the recipes with experts
        Select(d.find_element(By.ID, "recipe")).select_by_value("upscale")
        panes = _run_and_wait(d)
        columns = {p.get_attribute("data-recipe"): p.find_element(By.CLASS_NAME, "out").text for p in panes}
        deltas = [s.get_attribute("data-delta") for s in d.find_elements(By.CSS_SELECTOR, "#columns .pane.eft .tok")]
        coloured = d.find_elements(
            By.CSS_SELECTOR, "#columns .pane.eft .tok.attr-up, #columns .pane.eft .tok.attr-down"
        )
        usage = d.find_element(By.CSS_SELECTOR, "#columns .pane.eft .usage").text
        # Speculative: the up-scaled column reports acceptance.
        d.find_element(By.ID, "speculative").click()
        _run_and_wait(d)
        spec_usage = d.find_element(By.CSS_SELECTOR, "#columns .pane.eft .usage").text
        spec_text = d.find_element(By.CSS_SELECTOR, "#columns .pane.eft .out").text
        d.find_element(By.ID, "speculative").click()
        # Chat mode: the chat route, the same columns and colours.
        Select(d.find_element(By.ID, "mode")).select_by_value("chat")
        chat = [p.find_element(By.CLASS_NAME, "out").text for p in _run_and_wait(d)]
        chat_deltas = [s.get_attribute("data-delta") for s in d.find_elements(By.CSS_SELECTOR, ".pane.eft .tok")]
        Select(d.find_element(By.ID, "mode")).select_by_value("completion")
        # Bad input typed into the page: the API's own error, naming the field.
        temp = d.find_element(By.ID, "temperature")
        temp.clear()
        temp.send_keys("hot")
        d.find_element(By.ID, "run").click()
        wait_for(lambda: err.is_displayed() and "temperature" in err.text, 30, "the 400 message")
        bad = err.text
        d.save_screenshot(str(shot))
        return {
            "columns": columns,
            "deltas": deltas,
            "coloured": len(coloured),
            "usage": usage,
            "spec_usage": spec_usage,
            "spec_text": spec_text,
            "bad": bad,
            "chat": chat,
            "chat_deltas": chat_deltas,
        }
    finally:
        d.quit()


async def test_browser_keys_columns_attribution_and_bad_input(tmp_path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "lab", max_concurrent_streams=8)
    async with _http(Gate(load_key_store(path, None))) as s:
        got = await asyncio.to_thread(
            _browse_with_keys, s["url"], key, tmp_path / "profile", tmp_path / "playground.png"
        )
        # What the page showed is what the API answers for the same request (greedy, seed 0).
        prompt = "Q: What is the river of Vorlék?\nA:"
        common = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "seed": 0, "logprob_top_k": 20}
        for recipe in ("upscale", "large_base", "small_ft", "small_base"):
            extra = {"beta": 1, "expert_weights": {"small_ft": 1}} if recipe == "upscale" else {}
            body = {"model": recipe, **common, **extra}
            _, raw = await asyncio.to_thread(_get, s["port"], "/v1/completions", body, key)
            assert got["columns"][recipe] == json.loads(raw)["choices"][0]["text"], recipe
        body = {"model": "upscale", **common, "beta": 1, "logprobs": 1, "return_model_logprobs": True}
        _, raw = await asyncio.to_thread(_get, s["port"], "/v1/completions", body, key)
        lp = json.loads(raw)["choices"][0]["logprobs"]
    # Each up-scaled token's colour is log p_EFT − log p_large_base, from the API's own numbers.
    want = [m - b["large_base"] for m, b in zip(lp["token_logprobs"], lp["model_logprobs"])]
    assert [float(x) for x in got["deltas"]] == pytest.approx(want, abs=1.5e-3)
    assert got["coloured"] == sum(abs(x) >= 0.05 for x in want) >= 1
    assert "TTFT" in got["usage"] and "tok/s" in got["usage"] and f"{len(want)} tokens" in got["usage"]
    # Speculative decoding keeps the text (coupled acceptance) and reports its blocks.
    assert got["spec_text"] == got["columns"]["upscale"]
    assert re.search(r"accepted \d+/\d+ drafted", got["spec_usage"]), got["spec_usage"]
    assert all(got["chat"]) and got["chat_deltas"] and all(x != "" for x in got["chat_deltas"])
    assert "400 Bad Request" in got["bad"] and "param: temperature" in got["bad"], got["bad"]
    assert (tmp_path / "playground.png").stat().st_size > 10_000
