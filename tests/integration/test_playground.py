"""The playground page over real HTTP on loopback (uvicorn, a real coordinator and API-key gate over
fake-engine pools), and the page itself in headless Chromium: a missing or wrong key shows the 401
message and the key is stored nowhere, a good key streams every column (seen filling in), the
up-scaled tokens carry the attribution the API's per-model logprobs give and the hover card the
response's own alternatives, chat takes several turns, seed, exact mode and expert weights give the
API's answer, and bad input shows the API's error. The OpenAI extras it reads: test_playground_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re

import pytest
import uvicorn
from playground_browser import API_CALLS, WATCH_STREAMING, hover_tables, shown, start_chrome, wait_for

from eft_serve.auth.gate import Gate
from eft_serve.auth.keys import add_key, load_key_store
from eft_serve.infra.ports import free_port
from eft_serve.transport.openai_api import OpenAIApi
from eft_serve.transport.openai_http import build_openai_app

from fakes import playground_coordinator


@contextlib.asynccontextmanager
async def _http(gate: Gate | None):
    coord, engines = playground_coordinator()
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
        # Relative: under a route prefix (/x/playground) they resolve to /x/playground/...
        files = [b"playground/api.js", b"playground/tokens.js", b"playground/playground.js"]
        assert assets == [b"data:,", b"playground/playground.css", *files]  # scripts in load order
        for path in assets[1:]:
            kind = "text/css" if path.endswith(b".css") else "text/javascript"
            r, data = await asyncio.to_thread(_get, s["port"], "/" + path.decode())
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


def _run_and_wait(d, n: int = 4) -> list:
    """Click Run and wait for this run's `n` finished columns (not the previous run's)."""
    from selenium.webdriver.common.by import By

    old = d.find_elements(By.CSS_SELECTOR, "#columns .pane")
    d.find_element(By.ID, "run").click()

    def fresh() -> list | None:
        err = d.find_element(By.ID, "error")
        if err.is_displayed():
            pytest.fail(f"the page shows an error: {err.text}")
        panes = d.find_elements(By.CSS_SELECTOR, "#columns .pane")
        if any(p.id == o.id for p in panes for o in old):
            return None
        done = [p for p in panes if "finished" in p.get_attribute("class")]
        return panes if len(panes) == n == len(done) else None

    return wait_for(fresh, 60, f"{n} finished columns")


CHAT = ("hi", "ok?")  # the two user messages of the chat run
CHAT_TOKENS = 16


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
        # The key lives in the page's memory only: nothing stored, no cookie.
        stored = d.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
        cookies = d.get_cookies()
        options = [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#recipe option")]
        assert sorted(options) == ["interpolate", "upscale"]  # the recipes with experts
        Select(d.find_element(By.ID, "recipe")).select_by_value("upscale")
        d.execute_script(WATCH_STREAMING)
        panes = _run_and_wait(d)
        seen = d.execute_script("return window.seenWhileRunning")
        final = {
            p.get_attribute("data-recipe"): d.execute_script("return arguments[0].querySelector('.out').textContent", p)
            for p in panes
        }
        final_counts = {p.get_attribute("data-recipe"): len(p.find_elements(By.CLASS_NAME, "tok")) for p in panes}
        # Hover the first up-scaled token: the merged and per-model tables, from the response only.
        calls_before = d.execute_script(API_CALLS)
        tip_tables = hover_tables(d, "#columns .pane.eft .tok")
        calls_after = d.execute_script(API_CALLS)
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
        # Chat mode: the chat route, the same columns and colours, and per-model alternatives too
        # (short: two turns must fit the fakes' 96-token context).
        first_prompt = d.find_element(By.ID, "prompt").get_attribute("value")
        d.execute_script("document.getElementById('prompt').value = arguments[0]", CHAT[0])
        d.execute_script("document.getElementById('max-tokens').value = arguments[0]", str(CHAT_TOKENS))
        Select(d.find_element(By.ID, "mode")).select_by_value("chat")
        chat = [p.find_element(By.CLASS_NAME, "out").text for p in _run_and_wait(d)]
        chat_deltas = [s.get_attribute("data-delta") for s in d.find_elements(By.CSS_SELECTOR, ".pane.eft .tok")]
        chat_tip = hover_tables(d, "#columns .pane.eft .tok")
        # A second turn: Continue keeps the message and the up-scaled reply as turns.
        d.find_element(By.ID, "continue").click()
        assert d.find_element(By.ID, "prompt").get_attribute("value") == ""
        d.find_element(By.ID, "prompt").send_keys(CHAT[1])
        turns = d.execute_script(
            "return [...document.querySelectorAll('#turns .turn')].map((r) => "
            "[r.querySelector('.turn-role').value, r.querySelector('.turn-content').value])"
        )
        second = {p.get_attribute("data-recipe"): p.find_element(By.CLASS_NAME, "out").text for p in _run_and_wait(d)}
        for button in d.find_elements(By.CLASS_NAME, "turn-remove"):
            button.click()
        assert not d.find_elements(By.CSS_SELECTOR, "#turns .turn")
        d.execute_script("document.getElementById('prompt').value = arguments[0]", first_prompt)
        d.execute_script("document.getElementById('max-tokens').value = '48'")
        Select(d.find_element(By.ID, "mode")).select_by_value("completion")
        # Seed, exact mode and per-expert weights of a two-expert recipe, sampled (temperature 0.8).
        Select(d.find_element(By.ID, "recipe")).select_by_value("interpolate")
        for field, value in (
            ("weight-small_ft", "0.3"),
            ("weight-small_ft_b", "0.9"),
            ("temperature", "0.8"),
            ("seed", "7"),
        ):
            box = d.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        Select(d.find_element(By.ID, "merge")).select_by_value("exact")
        sampled = {
            p.get_attribute("data-recipe"): p.find_element(By.CLASS_NAME, "out").text for p in _run_and_wait(d, 5)
        }
        Select(d.find_element(By.ID, "merge")).select_by_value("topk")
        Select(d.find_element(By.ID, "recipe")).select_by_value("upscale")
        for field, value in (("temperature", "0"), ("seed", "0")):
            box = d.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
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
            "chat_tip": chat_tip,
            "first_prompt": first_prompt,
            "turns": turns,
            "second": second,
            "stored": stored,
            "cookies": cookies,
            "seen": seen,
            "final": final,
            "final_counts": final_counts,
            "tip": tip_tables,
            "calls_before": calls_before,
            "calls_after": calls_after,
            "sampled": sampled,
        }
    finally:
        d.quit()


async def test_browser_keys_columns_attribution_and_bad_input(tmp_path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "lab", max_concurrent_streams=8, exact_mode=True)
    async with _http(Gate(load_key_store(path, None))) as s:
        for engine in s["engines"].values():
            engine.delay_s = 0.01  # each step takes a moment: the columns are seen filling in
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
        body = {"model": "upscale", **common, "beta": 1, "logprobs": 5, "return_model_logprobs": True}
        _, raw = await asyncio.to_thread(_get, s["port"], "/v1/completions", body, key)
        lp = json.loads(raw)["choices"][0]["logprobs"]
        chat_body = {
            "model": "upscale",
            "messages": [{"role": "user", "content": CHAT[0]}],
            **{k: v for k, v in common.items() if k != "prompt"},
            "max_tokens": CHAT_TOKENS,
            "beta": 1,
            "logprobs": True,
            "top_logprobs": 5,
            "return_model_logprobs": True,
        }
        _, raw = await asyncio.to_thread(_get, s["port"], "/v1/chat/completions", chat_body, key)
        chat_answer = json.loads(raw)["choices"][0]
        chat_first = chat_answer["logprobs"]["content"][0]
        # Multi-turn: the turns kept are the message and the API's reply, and the second run is the
        # API's answer to the whole conversation, in every column.
        assert got["first_prompt"] == prompt and all(got["second"].values())
        assert got["turns"] == [["user", CHAT[0]], ["assistant", chat_answer["message"]["content"]]]
        conversation = [
            {"role": "user", "content": CHAT[0]},
            {"role": "assistant", "content": chat_answer["message"]["content"]},
            {"role": "user", "content": CHAT[1]},
        ]
        for recipe in ("upscale", "large_base", "small_ft", "small_base"):
            extra = {"beta": 1, "expert_weights": {"small_ft": 1}} if recipe == "upscale" else {}
            body = {"model": recipe, "messages": conversation, "max_tokens": CHAT_TOKENS, "temperature": 0, "seed": 0}
            _, raw = await asyncio.to_thread(
                _get, s["port"], "/v1/chat/completions", {**body, "logprob_top_k": 20, **extra}, key
            )
            assert got["second"][recipe] == json.loads(raw)["choices"][0]["message"]["content"], recipe
        # Seed, exact mode and expert weights as the page sent them: the API's answer, column by column.
        sampled = {"max_tokens": 48, "temperature": 0.8, "seed": 7, "logprob_top_k": 0, "prompt": prompt}
        weights = {"small_ft": 0.3, "small_ft_b": 0.9}
        for recipe in ("interpolate", "large_base", "small_ft", "small_ft_b", "small_base"):
            extra = {"beta": 1, "expert_weights": weights} if recipe == "interpolate" else {}
            _, raw = await asyncio.to_thread(
                _get, s["port"], "/v1/completions", {"model": recipe, **sampled, **extra}, key
            )
            assert got["sampled"][recipe] == json.loads(raw)["choices"][0]["text"], recipe
        others = []
        for body in ({"seed": 8}, {"expert_weights": {"small_ft": 1.0, "small_ft_b": 0.0}}, {"logprob_top_k": 2}):
            req = {"model": "interpolate", **sampled, "beta": 1, "expert_weights": weights, **body}
            _, raw = await asyncio.to_thread(_get, s["port"], "/v1/completions", req, key)
            others.append(json.loads(raw)["choices"][0]["text"])
    # ... and each setting matters: another seed, other weights, top-k instead of exact change the text.
    assert all(o != got["sampled"]["interpolate"] for o in others), others
    # The key was kept in memory only.
    assert got["stored"] == [0, 0, ""] and got["cookies"] == []
    # Streaming: while the columns ran, each showed a prefix of its answer, fewer tokens than at the end.
    for recipe, text in got["final"].items():
        partial = [(n, t) for r, n, t in got["seen"] if r == recipe and 0 < n < got["final_counts"][recipe]]
        assert partial, (recipe, got["final_counts"][recipe])
        assert all(text.startswith(t) and len(t) < len(text) for _, t in partial), recipe
    # Hover: the merged and each model's alternatives are the response's own, with no call on hover.
    first = 0
    want_tip = {
        "merged (EFT)": [shown(t, v) for t, v in sorted(lp["top_logprobs"][first].items(), key=lambda x: -x[1])]
    }
    for role in ("large_base", "small_ft", "small_base"):
        rows = sorted(lp["model_top_logprobs"][first][role].items(), key=lambda x: -x[1])
        want_tip[f"{role} alone"] = [shown(t, v) for t, v in rows]
    assert got["tip"] == want_tip
    assert got["calls_after"] == got["calls_before"]
    want_chat = {"merged (EFT)": [shown(a["token"], a["logprob"]) for a in chat_first["top_logprobs"]]}
    for role in ("large_base", "small_ft", "small_base"):
        want_chat[f"{role} alone"] = [shown(a["token"], a["logprob"]) for a in chat_first["model_top_logprobs"][role]]
    assert got["chat_tip"] == want_chat
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
