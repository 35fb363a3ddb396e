"""The playground page in headless Chromium against the session's real stack (Serve's HTTP proxy,
the coordinator replicas, the demo family's pools): the page loads, one prompt streams into the
up-scaled column and each single-model column (the same text the API gives), the up-scaled tokens
are coloured by log p_EFT − log p_large_base from the API's own per-model logprobs, hovering shows
the merged and per-model alternatives (the response's own `model_top_logprobs`, no call on
hover), the β sweep stacks five greedy answers (β = 0 is the large base's), and bad input shows
the API's error. The session stack has auth off, so the 401 path runs against a second coordinator
application with auth on (`eft-playground-keyed` at /keyed, over the same pools and proxy: one
coordinator replica, not a second stack), where the page at /keyed/playground calls /keyed/v1/....
"""

from __future__ import annotations

import http.client
import json

import pytest
from playground_browser import API_CALLS, WATCH_STREAMING, hover_tables, shown, start_chrome, wait_for

pytestmark = pytest.mark.cluster

MAX_TOKENS = 24
KEYED_APP = "eft-playground-keyed"
KEYED_PREFIX = "/keyed"


@pytest.fixture(scope="module")
def keyed_app(cluster_stack, tmp_path_factory):
    """The session stack's config with auth on, as one more coordinator application at /keyed."""
    from ray import serve

    from eft_serve.auth.keys import add_key
    from eft_serve.config import EftConfig
    from eft_serve.serve.app import coordinator_app
    from eft_serve.serve.local import wait_for_apps

    keys_file = tmp_path_factory.mktemp("playground-keys") / "keys.yaml"
    key = add_key(keys_file, "playground", max_concurrent_streams=8)
    data = cluster_stack["config"].model_dump(mode="json")
    data["auth"] = {"enabled": True, "keys_file": str(keys_file)}
    data["coordinator"]["replica"].update(num_replicas=1, autoscaling=None)
    cfg = EftConfig.model_validate(data)
    serve.run(coordinator_app({"config": cfg.model_dump(mode="json")}), name=KEYED_APP, route_prefix=KEYED_PREFIX)
    wait_for_apps([KEYED_APP], timeout_s=180)
    try:
        yield {"port": cluster_stack["config"].http.port, "key": key}
    finally:
        serve.delete(KEYED_APP)


def _complete(port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    assert resp.status == 200, raw
    return json.loads(raw)["choices"][0]


def _finished(d, css: str, n: int):
    from selenium.webdriver.common.by import By

    panes = d.find_elements(By.CSS_SELECTOR, css)
    done = [p for p in panes if "finished" in p.get_attribute("class")]
    return len(panes) == n and len(done) == n and panes


def test_playground_in_a_browser_against_the_stack(cluster_stack, tmp_path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    port = cluster_stack["config"].http.port
    question = cluster_stack["family"].world.held_out_questions()[0].prompt
    d = start_chrome(tmp_path / "profile", height=900)
    try:
        d.get(f"http://127.0.0.1:{port}/playground")
        wait_for(lambda: "recipes" in d.find_element(By.ID, "server").text, 60, "the recipe list")
        assert d.find_element(By.ID, "recipe").get_attribute("value") == "upscale"
        prompt = d.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(question)
        max_tokens = d.find_element(By.ID, "max-tokens")
        max_tokens.clear()
        max_tokens.send_keys(str(MAX_TOKENS))
        d.execute_script(WATCH_STREAMING)
        d.find_element(By.ID, "run").click()
        panes = wait_for(lambda: _finished(d, "#columns .pane", 4), 180, "four finished columns")
        columns = {p.get_attribute("data-recipe"): p.find_element(By.CLASS_NAME, "out").text for p in panes}
        counts = {p.get_attribute("data-recipe"): len(p.find_elements(By.CLASS_NAME, "tok")) for p in panes}
        seen = d.execute_script("return window.seenWhileRunning")
        final_text = d.execute_script("return document.querySelector('#columns .pane.eft .out').textContent")
        # The first up-scaled token's card: tables straight from the response, no call on hover.
        calls_before = d.execute_script(API_CALLS)
        first_tip = hover_tables(d, "#columns .pane.eft .tok")
        calls_after = d.execute_script(API_CALLS)
        usage = d.find_element(By.CSS_SELECTOR, "#columns .pane.eft .usage").text
        spans = d.find_elements(By.CSS_SELECTOR, "#columns .pane.eft .tok")
        deltas = [s.get_attribute("data-delta") for s in spans]
        coloured = [s for s in spans if {"attr-up", "attr-down"} & set(s.get_attribute("class").split())]
        assert coloured, deltas
        # Hover the most changed token: the merged alternatives at once, each model's on demand.
        strongest = max(coloured, key=lambda s: abs(float(s.get_attribute("data-delta"))))
        ActionChains(d).move_to_element(strongest).perform()
        tip = d.find_element(By.ID, "tip")
        wait_for(tip.is_displayed, 10, "the tooltip")
        titles_in_tip = lambda: [t.text for t in tip.find_elements(By.CLASS_NAME, "alts-title")]  # noqa: E731
        wanted = ["merged (EFT)", "large_base alone", "small_ft alone", "small_base alone"]
        wait_for(lambda: titles_in_tip() == wanted, 60, "the merged and per-model alternatives")
        tip_text = tip.text
        d.find_element(By.ID, "sweep").click()
        rows = wait_for(lambda: _finished(d, "#sweep-rows .pane", 5), 300, "five finished sweep rows")
        sweep = [r.find_element(By.CLASS_NAME, "out").text for r in rows]
        titles = [r.find_element(By.TAG_NAME, "h3").text for r in rows]
        strongest.click()  # pinned: the tooltip stays for the screenshot
        wait_for(lambda: tip.is_displayed() and titles_in_tip() == wanted, 30, "the pinned tooltip")
        d.save_screenshot(str(tmp_path / "playground.png"))
        # Bad input typed into the page: the API's error, naming the field.
        d.execute_script("document.getElementById('tip').hidden = true")
        max_tokens.clear()
        max_tokens.send_keys("lots")
        d.find_element(By.ID, "run").click()
        err = d.find_element(By.ID, "error")
        wait_for(lambda: err.is_displayed() and "max_tokens" in err.text, 60, "the 400 message")
        bad = err.text
    finally:
        d.quit()
    print(f"[playground] screenshot: {tmp_path / 'playground.png'}")

    # The page showed what the API answers to the same requests (greedy: deterministic).
    common = {"prompt": question, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 0, "logprob_top_k": 20}
    for recipe in ("large_base", "small_ft", "small_base"):
        assert columns[recipe] == _complete(port, {"model": recipe, **common})["text"], recipe
    up = _complete(port, {"model": "upscale", **common, "beta": 1, "logprobs": 5, "return_model_logprobs": True})
    assert columns["upscale"] == up["text"] and up["text"]
    lp = up["logprobs"]
    # Streaming: while the up-scaled column ran it showed a prefix with fewer tokens than at the end.
    partial = [(n, t) for r, n, t in seen if r == "upscale" and 0 < n < counts["upscale"]]
    assert partial, (counts, len(seen))
    assert all(final_text.startswith(t) and len(t) < len(final_text) for _, t in partial)
    # Hover: the merged table and each model's are the response's own numbers for that token.
    want_tip = {"merged (EFT)": [shown(t, v) for t, v in sorted(lp["top_logprobs"][0].items(), key=lambda x: -x[1])]}
    for role in ("large_base", "small_ft", "small_base"):
        rows = sorted(lp["model_top_logprobs"][0][role].items(), key=lambda x: -x[1])
        want_tip[f"{role} alone"] = [shown(t, v) for t, v in rows]
    assert first_tip == want_tip
    assert calls_after == calls_before
    want = [m - b["large_base"] for m, b in zip(lp["token_logprobs"], lp["model_logprobs"])]
    if len(deltas) == len(want):  # one span per token (no character split across tokens)
        assert [float(x) for x in deltas] == pytest.approx(want, abs=1.5e-3)
    assert "TTFT" in usage and "tok/s" in usage
    assert "Δ vs large_base alone" in tip_text and "no alternatives" not in tip_text
    assert titles == ["β = 0", "β = 0.5", "β = 1", "β = 1.5", "β = 2"]
    assert sweep[2] == columns["upscale"]  # β = 1, greedy: the up-scaled column
    assert sweep[0] == columns["large_base"]  # β = 0: the large base alone decides
    assert len(set(sweep)) > 1, sweep  # β changes the answer somewhere on the way to 2
    assert "400 Bad Request" in bad and "param: max_tokens" in bad, bad


def test_playground_keys_against_a_keyed_app_of_the_stack(keyed_app, tmp_path) -> None:
    # The real admission path (Serve's proxy, the coordinator replica's gate): no key and a wrong
    # key show the API's 401 message; the right key lists the recipes and is kept in memory only.
    from selenium.webdriver.common.by import By

    d = start_chrome(tmp_path / "profile")
    try:
        d.get(f"http://127.0.0.1:{keyed_app['port']}{KEYED_PREFIX}/playground")
        err = d.find_element(By.ID, "error")
        wait_for(lambda: err.is_displayed() and "401" in err.text, 60, "the 401 message")
        missing = err.text
        d.find_element(By.ID, "key").send_keys("eft_not_a_key\n")
        wait_for(lambda: "unknown API key" in err.text, 60, "the wrong key's 401 message")
        wrong = err.text
        key_field = d.find_element(By.ID, "key")
        key_field.clear()
        key_field.send_keys(keyed_app["key"] + "\n")
        wait_for(lambda: "recipes" in d.find_element(By.ID, "server").text, 60, "the recipe list")
        assert not err.is_displayed()
        options = [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#recipe option")]
        stored = d.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
        cookies = d.get_cookies()
        calls = d.execute_script(API_CALLS)
    finally:
        d.quit()
    assert "401 Unauthorized" in missing and "Bearer" in missing and "enter a valid API key" in missing, missing
    assert "401 Unauthorized" in wrong and "enter a valid API key" in wrong, wrong
    assert "upscale" in options
    assert stored == [0, 0, ""] and cookies == []
    # Under the prefix, /keyed/playground/ goes to /keyed/playground (not the root app's page).
    conn = http.client.HTTPConnection("127.0.0.1", keyed_app["port"], timeout=30)
    conn.request("GET", f"{KEYED_PREFIX}/playground/")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 308 and resp.getheader("location") == f"{KEYED_PREFIX}/playground"
    # Every call went to the keyed application's own routes.
    assert calls and all(c.startswith(f"http://127.0.0.1:{keyed_app['port']}{KEYED_PREFIX}/v1/") for c in calls), calls
