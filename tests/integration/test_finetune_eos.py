"""A chat fine-tune whose EOS differs from its base's (issue 18): the pools still merge, and an
up-scaled stream stops at the fine-tune's end-of-turn token with finish reason ``eos``.

Real pairs differ there: Qwen2.5-Instruct's EOS is ``<|im_end|>`` where the base's is
``<|endoftext|>``, and Llama-3-Instruct lists ``<|eot_id|>`` in its generation config. Here a
random-weight Llama family over the demo tokenizer: the fine-tune's EOS is set (in its tokenizer,
or in its ``generation_config.json``) to a token the exact greedy up-scaling emits a few tokens
in, so the stream must end right there; the other recipes, whose models do not name it, go on.
Fake-engine pools then check the same inside speculative blocks, and that a role's own tokenizer
(a co-located LoRA role's) adds its EOS.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from eft_serve.config import CoordinatorConfig, demo_config
from eft_serve.coordinator.request import GenerationRequest, MergeOptions, SpeculativeOptions
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.engine.hf_engine import HFEngine
from eft_serve.reference import ReferenceEFT
from eft_serve.testing.arch_families import build_arch_family, demo_tokenizer
from eft_serve.testing.fake_engine import FakeEngine
from eft_serve.transport.inprocess import InProcessPool

from fakes import EOS, RECIPES, VOCAB, CharTokenizer, fake_coordinator, fake_engines

ROLES = ("large_base", "small_base", "small_ft")
UPSCALE = {"large_base": 1.0, "small_ft": 1.0, "small_base": -1.0}
PROMPT = "Q: Where does the"
N = 16


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    tokenizer = demo_tokenizer()
    fam = build_arch_family("llama", tmp_path_factory.mktemp("eos"), tokenizer=tokenizer)
    n = len(tokenizer)
    base_eos = int(tokenizer.eos_token_id)
    ids = tokenizer.encode(PROMPT)
    free, _ = ReferenceEFT(fam.paths, UPSCALE, support=n).greedy(ids, N)
    # The fine-tune's end-of-turn token: the first one greedy emits for the first time at step >= 2.
    at = next(j for j in range(2, N) if free[j] not in free[:j] and base_eos not in free[: j + 1])
    return {"family": fam, "tokenizer": tokenizer, "ids": ids, "free": free, "at": at, "turn_end": free[at]}


def _coordinator(family, how: str) -> EftCoordinator:
    fam, tokenizer, turn_end = family["family"], family["tokenizer"], family["turn_end"]
    ft_dir = fam.paths["small_ft"]
    config = json.loads((ft_dir / "generation_config.json").read_text())
    config["eos_token_id"] = int(tokenizer.eos_token_id)  # as saved: the base's, in every config
    if how == "tokenizer":  # Qwen2.5-Instruct: the tokenizer names another EOS, same vocabulary
        ft_tok = demo_tokenizer()
        ft_tok.add_special_tokens({"eos_token": ft_tok.convert_ids_to_tokens(turn_end)})
        assert ft_tok.get_vocab() == tokenizer.get_vocab() and ft_tok.eos_token_id != tokenizer.eos_token_id
        ft_tok.save_pretrained(ft_dir)
        (ft_dir / "generation_config.json").write_text(json.dumps(config))
    else:  # Llama-3-Instruct: the generation config lists the end-of-turn token beside the EOS
        tokenizer.save_pretrained(ft_dir)
        config["eos_token_id"] = [int(tokenizer.eos_token_id), turn_end]
        (ft_dir / "generation_config.json").write_text(json.dumps(config))
    engines = {r: HFEngine.load(fam.paths[r], name=r, device="cpu", kv_cache_bytes=2**24) for r in ROLES}
    assert turn_end in engines["small_ft"].info.stop_ids()
    assert turn_end not in engines["large_base"].info.stop_ids() | engines["small_base"].info.stop_ids()
    # Same vocabulary fingerprint for all three, whatever their EOS: start-up must accept them.
    assert len({e.info.vocab_fingerprint for e in engines.values()}) == 1
    return EftCoordinator(
        {r: InProcessPool(e, r) for r, e in engines.items()},
        demo_config().recipes,
        tokenizer,
        CoordinatorConfig(max_new_tokens_cap=64),
    )


async def _greedy(coord: EftCoordinator, recipe: str, ignore_eos: bool = False) -> tuple[list[int], str | None]:
    stream = await coord.generate(
        GenerationRequest(
            prompt=PROMPT,
            merge=MergeOptions(recipe=recipe, logprob_top_k=0),
            temperature=0,
            max_new_tokens=N,
            ignore_eos=ignore_eos,
        )
    )
    chunks = [c async for c in stream]
    return [t.token_id for c in chunks for t in c.tokens], chunks[-1].finish_reason


@pytest.mark.parametrize("how", ["tokenizer", "generation_config"])
async def test_upscaling_stops_at_the_finetunes_end_of_turn_token(family, how: str) -> None:
    coord = _coordinator(family, how)
    await coord.start()
    try:
        at, turn_end, free = family["at"], family["turn_end"], family["free"]
        base_eos = int(family["tokenizer"].eos_token_id)
        assert coord.stop_token_ids("upscale") == {base_eos, turn_end}
        got, finish = await _greedy(coord, "upscale")
        assert (got, finish) == (free[: at + 1], "eos")
        # The independent reference, stopping at every stop id of the recipe, agrees.
        fam = family["family"]
        expected, _ = ReferenceEFT(fam.paths, UPSCALE, support=fam.tokenizer_size).greedy(
            family["ids"], N, eos_token_id={base_eos, turn_end}
        )
        assert got == expected
        # ignore_eos still runs through it, to the token budget.
        got, finish = await _greedy(coord, "upscale", ignore_eos=True)
        assert (got, finish) == (free, "length")
        # A recipe without the fine-tune does not stop at its end-of-turn token.
        assert coord.stop_token_ids("large_base") == {base_eos}
    finally:
        await coord.stop()


TURN_END = 40  # the fine-tune's end-of-turn id in the fake-engine tests (not the fakes' EOS)


def _walkers(**ft: object) -> dict[str, FakeEngine]:
    """Every model walks up the ids (t -> t + 1), never choosing EOS: only a stop id ends a stream."""
    table = np.zeros((VOCAB, VOCAB), dtype=np.float32)
    for t in range(VOCAB - 1):
        table[t, (t + 1) % (VOCAB - 1)] = 6.0
    walker = dict(table=table, eos_token_id=EOS, max_context=96)
    return fake_engines(
        large_base=FakeEngine(VOCAB, name="large_base", **walker),
        small_base=FakeEngine(VOCAB, name="small_base", **walker),
        small_ft=FakeEngine(VOCAB, name="small_ft", **{**walker, **ft}),
    )


async def _fake_run(coord: EftCoordinator, recipe: str, speculative: bool) -> tuple[list[int], str | None]:
    stream = await coord.generate(
        GenerationRequest(
            prompt="b",
            merge=MergeOptions(recipe=recipe),
            temperature=0,
            max_new_tokens=50,
            speculative=SpeculativeOptions(enabled=speculative, max_draft_tokens=8, adaptive=False),
        )
    )
    chunks = [c async for c in stream]
    return [t.token_id for c in chunks for t in c.tokens], chunks[-1].finish_reason


@pytest.mark.parametrize("speculative", [False, True])
async def test_a_stop_id_of_the_finetune_ends_plain_and_speculative_streams_alike(speculative: bool) -> None:
    coord = fake_coordinator(_walkers(stop_token_ids=(EOS, TURN_END)))
    await coord.start()
    walk = list(range(2, 52))  # the prompt "b" is id 1
    got, finish = await _fake_run(coord, "upscale", speculative)
    assert (got, finish) == (walk[: walk.index(TURN_END) + 1], "eos")
    # The large base alone names no such stop: it walks on to the token budget.
    got, finish = await _fake_run(coord, "large_base", speculative)
    assert (got, finish) == (walk, "length")
    await coord.stop()


class _TurnEndTokenizer(CharTokenizer):
    """A LoRA role's own tokenizer files (same ids) naming another EOS."""

    eos_token_id = TURN_END


async def test_a_roles_own_tokenizer_adds_its_eos_to_the_stop_ids() -> None:
    # A co-located LoRA role answers with its host's identity; its own tokenizer (loaded by the
    # coordinator for chat prompts) is what names its end-of-turn token.
    engines = _walkers()
    coord = EftCoordinator(
        {r: InProcessPool(e, r) for r, e in engines.items()},
        RECIPES,
        CharTokenizer(),
        CoordinatorConfig(max_new_tokens_cap=64),
        tokenizers={"small_ft": _TurnEndTokenizer()},
    )
    await coord.start()
    assert coord.stop_token_ids("upscale") == {EOS, TURN_END} and coord.stop_token_ids("large_base") == {EOS}
    got, finish = await _fake_run(coord, "upscale", speculative=False)
    assert got[-1] == TURN_END and finish == "eos"
    await coord.stop()
