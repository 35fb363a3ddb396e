"""The OpenAI extras the playground reads (a real coordinator over fake-engine pools, in process):
a model card's recipe, each model's logprob of every token, each model's own top alternatives at
each position (completion and chat), and the per-choice timing in usage.
"""

from __future__ import annotations

import numpy as np
import pytest

from eft_serve.transport.openai_api import OpenAIApi
from eft_serve.transport.openai_schema import BadParam

from fakes import CharTokenizer, playground_coordinator


async def test_model_logprobs_are_each_models_and_usage_has_timing() -> None:
    coord, engines = playground_coordinator()
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


def _own_top(engine, prefix: list[int], n: int) -> dict[str, float]:
    own = engine.logprobs(prefix)
    tok = CharTokenizer()
    return {tok.decode([i]): float(own[i]) for i in sorted(range(len(own)), key=lambda i: (-own[i], i))[:n]}


@pytest.mark.parametrize("logprob_top_k", [0, 8])
async def test_model_top_logprobs_are_each_models_own_alternatives(logprob_top_k: int) -> None:
    # What the page's hover shows per model: each model's own top-N at the prefix it saw, in the
    # response itself, in completion and in chat mode.
    coord, engines = playground_coordinator()
    await coord.start()
    api = OpenAIApi(coord)
    tok = CharTokenizer()
    roles = ("large_base", "small_ft", "small_base")
    common = {"max_tokens": 8, "temperature": 0, "logprob_top_k": logprob_top_k, "return_model_logprobs": True}
    try:
        prompt = "hello there"
        out = await api.completions({"model": "upscale", "prompt": prompt, "logprobs": 5, "beta": 1.5, **common})
        lp = out["choices"][0]["logprobs"]
        assert len(lp["model_top_logprobs"]) == len(lp["tokens"]) > 0
        prefix = tok.encode(prompt)
        for text, alts in zip(lp["tokens"], lp["model_top_logprobs"]):
            assert set(alts) == set(roles)
            for role in roles:
                assert alts[role] == pytest.approx(_own_top(engines[role], prefix, 5), abs=1e-4), role
            prefix += tok.encode(text)
        # Chat: at each position, each model's own top-5 after its own rendering of the chat.
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        chat = await api.chat_completions(
            {"model": "upscale", "messages": messages, "logprobs": True, "top_logprobs": 5, **common}
        )
        entries = chat["choices"][0]["logprobs"]["content"]
        assert entries
        prefix = tok.encode("System: be brief\nUser: hi\nAssistant:")
        for e in entries:
            for role in roles:
                got = {a["token"]: a["logprob"] for a in e["model_top_logprobs"][role]}
                assert got == pytest.approx(_own_top(engines[role], prefix, 5), abs=1e-4), role
                assert all(a["bytes"] == list(a["token"].encode()) for a in e["model_top_logprobs"][role])
            prefix += tok.encode(e["token"])
        # ... and at the first position that is what each single-model recipe answers on its own.
        for role in roles:
            alone = await api.chat_completions(
                {
                    "model": role,
                    "messages": messages,
                    "logprobs": True,
                    "top_logprobs": 5,
                    "max_tokens": 1,
                    "temperature": 0,
                    "logprob_top_k": 0,
                }
            )
            first = alone["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            assert {a["token"]: a["logprob"] for a in entries[0]["model_top_logprobs"][role]} == pytest.approx(
                {a["token"]: a["logprob"] for a in first}, abs=1e-4
            )
        # Not asked: absent (return_model_logprobs without alternatives, or alternatives alone).
        bare = await api.completions({"model": "upscale", "prompt": prompt, "logprobs": 0, **common})
        assert "model_top_logprobs" not in bare["choices"][0]["logprobs"]
        plain = await api.completions({"model": "upscale", "prompt": prompt, "logprobs": 5, "max_tokens": 2})
        assert "model_top_logprobs" not in plain["choices"][0]["logprobs"]
    finally:
        await coord.stop()
