"""Chat prompts end to end (issue 12 item 2): every pool sees the conversation in its own format.

Fake-engine pools (in process and over real gRPC on loopback): the merged greedy output equals an
independent reference that scores each model on its own prompt + the shared generated tokens,
speculative decoding equals plain decoding, each pool is sent its own prefix, the context limit
counts the longest prompt. The demo family: `upscale_chat` answers held-out questions in the chat
expert's style only when the expert sees its chat format, and the chat add-on is reproducible.
"""

from __future__ import annotations

import numpy as np
import pytest

from eft_serve.client import AsyncEftClient
from eft_serve.config import CoordinatorConfig, RecipeConfig
from eft_serve.coordinator.request import ChatMessage, GenerationRequest, MergeOptions, SpeculativeOptions
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.errors import InvalidArgument
from eft_serve.testing.grpc_coordinator import start_coordinator_server, start_pool_server
from eft_serve.testing.grpc_pool import GrpcPoolClient
from eft_serve.transport.coordinator_rpc import CoordinatorRpc
from eft_serve.transport.inprocess import InProcessPool
from eft_serve.transport.pool_rpc import PoolRpc

from fakes import EOS, CharTokenizer, fake_engines

# large_base and small_ft get templates, small_base "own" (CharTokenizer has no chat template:
# the plain transcript). CharTokenizer drops characters it lacks (":" and newlines).
RECIPES = {
    "chat": RecipeConfig(
        base="large_base",
        experts=["small_ft"],
        reference="small_base",
        prompt_format={
            "large_base": {"template": "{% for m in messages %}Q {{ m.content }} A{% endfor %}"},
            "small_ft": {"template": "{% for m in messages %}{{ m.role }} says {{ m.content }} {% endfor %}reply"},
        },
    ),
    "long_expert": RecipeConfig(
        base="large_base",
        experts=["small_ft"],
        reference="small_base",
        prompt_format={"small_ft": {"template": "{{ 'padding ' * 6 }}{{ messages[-1].content }}"}},
    ),
}
MESSAGES = (ChatMessage("user", "hello there"),)
OWN_TEXT = {  # what each model of "chat" must see for MESSAGES, written out by hand
    "large_base": "Q hello there A",
    "small_ft": "user says hello there reply",
    "small_base": "User: hello there\nAssistant:",
}


def reference_greedy(engines, coefs: dict[str, float], prompts: dict[str, list[int]], n: int) -> list[int]:
    """Greedy merge where each model scores its own prompt followed by the shared generated tokens."""
    out: list[int] = []
    for _ in range(n):
        score = sum(c * engines[r].logprobs(prompts[r] + out).astype(np.float64) for r, c in coefs.items())
        tok = int(np.argmax(score))
        out.append(tok)
        if tok == EOS:
            break
    return out


def coordinator(engines, **cfg) -> EftCoordinator:
    pools = {role: InProcessPool(e, role) for role, e in engines.items()}
    config = CoordinatorConfig(
        **{"default_recipe": "chat", "max_new_tokens_cap": 128, "default_max_new_tokens": 16, **cfg}
    )
    return EftCoordinator(pools, RECIPES, CharTokenizer(), config)


async def run(coord, **kw):
    stream = await coord.generate(GenerationRequest(prompt="", messages=MESSAGES, temperature=0, **kw))
    chunks = [c async for c in stream]
    return [t.token_id for c in chunks for t in c.tokens], chunks


async def test_each_pool_scores_its_own_prompt_and_the_merge_is_exact() -> None:
    engines = fake_engines()
    coord = coordinator(engines)
    await coord.start()
    tok = CharTokenizer()
    prompts = {role: tok.encode(text) for role, text in OWN_TEXT.items()}
    assert len({tuple(p) for p in prompts.values()}) == 3  # three different prompts
    expected = reference_greedy(engines, {"large_base": 1, "small_ft": 1.5, "small_base": -1.5}, prompts, 20)
    ids, chunks = await run(coord, max_new_tokens=20, merge=MergeOptions(logprob_top_k=0, beta=1.5))
    assert ids == expected
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == len(prompts["large_base"])  # the base's prompt
    # One shared prompt for all (the base's) decodes something else: the per-role prompts matter.
    shared = {role: prompts["large_base"] for role in prompts}
    assert reference_greedy(engines, {"large_base": 1, "small_ft": 1.5, "small_base": -1.5}, shared, 20) != expected


@pytest.mark.parametrize("logprob_top_k", [0, 7])
async def test_speculative_with_per_role_prompts_equals_plain(logprob_top_k: int) -> None:
    coord = coordinator(fake_engines())
    await coord.start()
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 11}):
        kw = {"max_new_tokens": 24, "ignore_eos": True, "merge": MergeOptions(logprob_top_k=logprob_top_k)}
        req = GenerationRequest(prompt="", messages=MESSAGES, **kw, **sampling)  # type: ignore[arg-type]
        plain = [t.token_id for c in [c async for c in await coord.generate(req)] for t in c.tokens]
        spec_req = GenerationRequest(
            prompt="",
            messages=MESSAGES,
            speculative=SpeculativeOptions(enabled=True, max_draft_tokens=4),
            **kw,  # type: ignore[arg-type]
            **sampling,  # type: ignore[arg-type]
        )
        chunks = [c async for c in await coord.generate(spec_req)]
        assert [t.token_id for c in chunks for t in c.tokens] == plain
        assert chunks[-1].usage is not None and chunks[-1].usage.speculation.speculative_blocks > 0


async def test_context_limit_counts_the_longest_prompt() -> None:
    engines = fake_engines()  # max_context 96
    coord = coordinator(engines)
    await coord.start()
    tok = CharTokenizer()
    longest = len(tok.encode("padding " * 6 + "hello there"))
    base = len(tok.encode("User: hello there\nAssistant:"))
    assert longest > base
    ids, chunks = await run(
        coord, max_new_tokens=128, ignore_eos=True, merge=MergeOptions(recipe="long_expert", logprob_top_k=0)
    )
    # The expert's prefix reaches the context first: the stream ends there, not at the base's limit.
    assert chunks[-1].finish_reason == "context"
    assert len(ids) == 96 - longest


async def test_bad_chat_requests_fail_before_any_pool_call() -> None:
    coord = coordinator(fake_engines())
    await coord.start()
    with pytest.raises(InvalidArgument, match="either prompt or messages"):
        await coord.generate(GenerationRequest(prompt="x", messages=MESSAGES))
    with pytest.raises(InvalidArgument, match="role is 'tool'"):
        await coord.generate(GenerationRequest(prompt="", messages=(ChatMessage("tool", "x"),)))


# ---- over real gRPC on loopback -------------------------------------------------------------


@pytest.fixture
async def grpc_stack():
    servers, clients, rpcs, pools = [], [], {}, {}
    engines = fake_engines()
    for role, engine in engines.items():
        rpcs[role] = PoolRpc(engine, role)
        server, port = await start_pool_server(rpcs[role])
        servers.append(server)
        pools[role] = GrpcPoolClient(f"127.0.0.1:{port}", role, timeout_s=2.0)
        clients.append(pools[role])
    coord = EftCoordinator(
        pools,
        RECIPES,
        CharTokenizer(),
        CoordinatorConfig(default_recipe="chat", max_new_tokens_cap=64, pool_call_timeout_s=2.0),
    )
    await coord.start()
    server, port = await start_coordinator_server(CoordinatorRpc(coord))
    servers.append(server)
    try:
        yield {"address": f"127.0.0.1:{port}", "engines": engines, "rpcs": rpcs}
    finally:
        await coord.stop()
        for c in clients:
            await c.close()
        for s in servers:
            await s.stop(grace=None)


async def test_messages_over_grpc(grpc_stack, capsys) -> None:
    import asyncio

    import grpc

    from eft_serve_client.cli import main as client_main

    tok, n = CharTokenizer(), 12
    prompts = {role: tok.encode(text) for role, text in OWN_TEXT.items()}
    expected = reference_greedy(grpc_stack["engines"], {"large_base": 1, "small_ft": 1, "small_base": -1}, prompts, n)
    async with AsyncEftClient(grpc_stack["address"], timeout=20) as client:
        reply = await client.chat(
            [{"role": "user", "content": "hello there"}], temperature=0, max_new_tokens=n, logprob_top_k=0
        )
        assert list(reply.token_ids) == expected and reply.usage.prompt_tokens == len(prompts["large_base"])
        # Each pool was sent its own whole prompt once, then one new token per step.
        for role, prompt in prompts.items():
            assert grpc_stack["rpcs"][role].tokens_received == len(prompt) + (len(expected) - 1), role
        # Streamed: the same tokens.
        streamed = [t.token_id async for m in client.generate("", messages=[("user", "hello there")], temperature=0, max_new_tokens=n, logprob_top_k=0) for t in m.tokens]  # fmt: skip
        assert streamed == expected
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.chat([("robot", "hi")], max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete("text", messages=[("user", "hi")], max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The slim CLI: `--chat` sends the prompt as a user message (sync client: off the event loop).
    argv = ["generate", "hello there", "--chat", "--address", grpc_stack["address"], "--temperature", "0"]
    argv += ["--max-new-tokens", str(n), "--logprob-top-k", "0"]
    capsys.readouterr()
    assert await asyncio.to_thread(client_main, argv) == 0
    assert capsys.readouterr().out.strip() == tok.decode(expected).strip()


# ---- the demo family's chat expert ----------------------------------------------------------

DEMO_ROLES = ("large_base", "small_base", "small_chat")


@pytest.fixture(scope="module")
def demo_chat(demo_family):
    from transformers import AutoTokenizer

    from eft_serve.config import demo_config
    from eft_serve.engine.hf_engine import HFEngine

    recipes = {name: r for name, r in demo_config(with_chat=True).recipes.items() if set(r.roles()) <= set(DEMO_ROLES)}
    # The same recipe, but the chat expert sees the plain transcript instead of its own template.
    plain = recipes["upscale_chat"].model_copy(deep=True)
    plain.prompt_format["small_chat"] = "plain"
    recipes["upscale_chat_plain_expert"] = plain
    tokenizers = {r: AutoTokenizer.from_pretrained(demo_family.paths[r]) for r in DEMO_ROLES}
    engines = {r: HFEngine.load(demo_family.paths[r], name=r, device="cpu") for r in DEMO_ROLES}
    coord = EftCoordinator(
        {r: InProcessPool(e, r) for r, e in engines.items()},
        recipes,
        tokenizers["large_base"],
        CoordinatorConfig(default_recipe="upscale_chat", max_new_tokens_cap=64),
        tokenizers=tokenizers,
    )
    return coord, tokenizers, demo_family


async def answers(coord, questions, recipe: str) -> list[str]:
    out = []
    for q in questions:
        stream = await coord.generate(
            GenerationRequest(
                prompt="",
                messages=(ChatMessage("user", q.text),),
                merge=MergeOptions(recipe=recipe),
                temperature=0,
                max_new_tokens=24,
            )
        )
        out.append("".join([c.text async for c in stream]))
    return out


async def test_demo_chat_expert_needs_its_chat_format(demo_chat) -> None:
    from eft_serve.demo.world import SMILE, chat_prompt_for, style_of

    coord, toks, family = demo_chat
    await coord.start()
    world = family.world
    # Each model gets its own prompt: the expert its chat template, the bases their Q/A format.
    q = world.held_out_questions()[0]
    plan = coord._started()[0].generation(
        GenerationRequest(prompt="", messages=(ChatMessage("user", q.text),), temperature=0)
    )
    assert toks["large_base"].decode(plan.prompt_ids) == q.prompt
    assert toks["small_chat"].decode(plan.prompt_of("small_chat")) == chat_prompt_for(q.entity, q.attribute)
    assert plan.prompt_of("small_base") == plan.prompt_ids

    questions = world.held_out_questions()[::15][:12]  # held-out: facts only the large base knows
    results = {}
    for recipe in ("upscale_chat", "upscale_chat_plain_expert", "small_chat"):
        texts = await answers(coord, questions, recipe)
        results[recipe] = {
            "accuracy": sum(world.is_correct(q, t) for q, t in zip(questions, texts)) / len(questions),
            "chat_style": sum(style_of(t) == "a" and SMILE in t for t in texts) / len(questions),
        }
    own, plain, alone = results["upscale_chat"], results["upscale_chat_plain_expert"], results["small_chat"]
    print("\nchat expert, 12 held-out questions:", results)
    # Own format: the large base's knowledge in the chat expert's style.
    assert own["chat_style"] >= 0.9 and own["accuracy"] >= 0.75, results
    # The expert fed a format it was not tuned on: its behaviour is lost.
    assert own["chat_style"] - plain["chat_style"] >= 0.5, results
    # The expert alone has the style but not the facts (up-scaling supplies them).
    assert alone["chat_style"] >= 0.9 and own["accuracy"] >= alone["accuracy"] + 0.3, results


def test_demo_chat_expert_is_reproducible_and_carries_its_template(demo_family, tmp_path) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from eft_serve.demo import family as fam_mod
    from eft_serve.demo.world import CHAT_TEMPLATE

    path = demo_family.paths[fam_mod.CHAT_ROLE]
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template == CHAT_TEMPLATE
    assert AutoTokenizer.from_pretrained(demo_family.paths["small_base"]).chat_template is None
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(demo_family.paths["small_base"]).get_vocab()
    # Rebuilt from the family's small base (the add-on path), the weights are bit-identical to the
    # family's chat expert (however it was made: with a fresh build or added to an older family).
    out = tmp_path / "small_chat"
    out.mkdir()
    base = GPT2LMHeadModel.from_pretrained(str(demo_family.paths["small_base"]))
    base_tok = AutoTokenizer.from_pretrained(str(demo_family.paths["small_base"]))
    fam_mod._build_chat_expert(base, base_tok, demo_family.world, demo_family.seed, out, None)
    assert fam_mod.weights_sha256(out) == demo_family.fingerprint()["roles"][fam_mod.CHAT_ROLE]["sha256"]
    assert fam_mod.weights_sha256(out) != demo_family.fingerprint()["roles"]["small_ft"]["sha256"]
