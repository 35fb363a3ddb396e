"""The built-in demo family: the synthetic world, the shared tokenizer, training, the cached build.

Everything here is fast and trains nothing (builds are faked); the trained family's own checks are
in tests/integration/test_demo_family_models.py.
"""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

import pytest

from eft_serve.demo import family as fam_mod
from eft_serve.demo.build_spec import BUILD_SPEC, FORMAT_VERSION, build_spec_hash
from eft_serve.demo.world import (
    ATTRIBUTES,
    SMILE,
    STYLE_RATE_A,
    STYLE_RATE_B,
    STYLES,
    VALUES,
    World,
    answer_text,
    style_of,
    style_score,
)

# ---- the world --------------------------------------------------------------------------------


def test_world_is_deterministic_per_seed() -> None:
    a, b, c = World.from_seed(0), World.from_seed(0), World.from_seed(1)
    assert [(e.name, e.facts, e.held_out) for e in a.entities] == [(e.name, e.facts, e.held_out) for e in b.entities]
    assert a.pretraining_docs(3) == b.pretraining_docs(3)
    assert a.finetune_examples("a", 1) == b.finetune_examples("a", 1)
    assert [e.name for e in a.entities] != [e.name for e in c.entities]
    assert a.pretraining_docs(0) != a.pretraining_docs(1)  # fresh phrasings per epoch


def test_world_shape() -> None:
    w = World.from_seed(0)
    names = [e.name for e in w.entities]
    assert len(set(names)) == len(names) >= 200
    held, train = w.held_out_entities(), w.train_entities()
    assert held and train and not {e.name for e in held} & {e.name for e in train}
    assert all(q.held_out for q in w.held_out_questions())
    assert len(w.held_out_questions()) == len(held) * len(ATTRIBUTES)
    q = w.held_out_questions()[0]
    assert q.prompt.startswith("Q: ") and q.prompt.endswith("\nA:") and q.entity in q.prompt
    assert q.answer == w.by_name[q.entity].facts[q.attribute]
    assert any(ord(ch) > 0x7F for n in names for ch in n)  # non-ASCII names
    assert any(ord(ch) > 0x2E7F for n in names for ch in n)  # a few CJK names


def test_held_out_entities_absent_from_finetuning_data() -> None:
    w = World.from_seed(0)
    held = [e.name for e in w.held_out_entities()]
    for style in STYLES:
        for epoch in range(3):
            examples = w.finetune_examples(style, epoch)
            assert len(examples) == len(w.train_questions())
            text = "\n".join(p + a for p, a in examples)
            for name in held:
                assert re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", text) is None, name
            assert all(style_of(a) == style for _, a in examples)


def test_pretraining_teaches_held_out_facts_and_shows_both_styles() -> None:
    w = World.from_seed(0)
    docs = w.pretraining_docs(0)
    text = "\n".join(docs)
    for e in w.held_out_entities():
        for a in ATTRIBUTES:
            assert re.search(re.escape(e.name) + r"[^\n]*" + re.escape(e.facts[a]), text)
    qa = [d.split("\nA:", 1)[1] for d in docs if d.startswith("Q: ")]
    rates = {s: sum(style_of(x) == s for x in qa) / len(qa) for s in STYLES}
    assert rates["a"] == pytest.approx(STYLE_RATE_A, abs=0.01) and 0.05 <= rates["a"] <= 0.1
    assert rates["b"] == pytest.approx(STYLE_RATE_B, abs=0.01) and 0.05 <= rates["b"] <= 0.1


def test_scoring_helpers() -> None:
    w = World.from_seed(0)
    q = w.held_out_questions()[1]
    wrong = next(v for v in VALUES[q.attribute] if v != q.answer)
    for s in STYLES:
        right = answer_text(q.entity, q.attribute, q.answer, s)
        assert style_of(right) == s and style_score(right, s) == 1.0
        assert w.is_correct(q, right)
        assert not w.is_correct(q, answer_text(q.entity, q.attribute, wrong, s))
        assert w.is_correct(q, right + "<|endoftext|>Q: junk " + wrong)
    assert answer_text(q.entity, q.attribute, q.answer, "a").endswith(SMILE)
    assert not w.is_correct(q, " I do not know.") and style_of(" I do not know.") == "plain"
    assert style_score(" Certainly! no smile.", "a") == 0.5


# ---- tokenizer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from eft_serve.demo.tokenizer import train_tokenizer

    return train_tokenizer(World.from_seed(0))


def test_tokenizer_round_trips_non_ascii(tokenizer) -> None:
    w = World.from_seed(0)
    cjk = next(e.name for e in w.entities if any(ord(ch) > 0x2E7F for ch in e.name))
    samples = [w.qa_doc(q, s) for q in w.held_out_questions()[:9] for s in STYLES]
    samples += [
        f"Q: What is the river of {cjk}?\nA: Certainly! The river of {cjk} is Rhøna. {SMILE}",
        "Brønholt, Ostaré, Tavenü, Påtinka — \u00e9\u00fc\u00f8 \u9f8d\u5c71 \U0001f600",
    ]
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert 512 <= len(tokenizer) <= 1024
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer.eos_token_id


def test_a_non_ascii_character_is_split_across_tokens(tokenizer) -> None:
    # The style-A smile is a 4-byte character never merged: a streaming detokeniser must buffer it.
    ids = tokenizer(" " + SMILE, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4
    pieces = [tokenizer.decode(ids[:i]) for i in range(1, len(ids))]
    assert any("\ufffd" in p for p in pieces)  # a prefix of the tokens is not valid UTF-8
    a_answer = answer_text("Brøk", "river", "Sendu", "a")
    assert len(tokenizer(a_answer, add_special_tokens=False)["input_ids"]) > len(tokenizer.tokenize(a_answer[:-1]))


def test_tokenizer_training_is_deterministic(tokenizer) -> None:
    from eft_serve.demo.tokenizer import train_tokenizer

    again = train_tokenizer(World.from_seed(0))
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


# ---- training ---------------------------------------------------------------------------------


def test_packing_keeps_documents_whole(tokenizer) -> None:
    from eft_serve.demo.train import pack_documents

    docs = World.from_seed(0).pretraining_docs(0)[:50]
    x, y = pack_documents(tokenizer, docs, block_size=64)
    eos = tokenizer.eos_token_id
    text = [tokenizer.decode([t for t, lab in zip(xr.tolist(), yr.tolist()) if lab != -100]) for xr, yr in zip(x, y)]
    rebuilt = [d for block in text for d in block.split("<|endoftext|>") if d]
    assert sorted(rebuilt) == sorted(docs)
    assert int((y != -100).sum()) == sum(len(tokenizer(d)["input_ids"]) + 1 for d in docs)
    assert bool((x[y == -100] == eos).all())


# ---- the cache: locking and completion marker (with a fake, fast build) ------------------------


def _fake_build(out: Path, seed: int = 0, log=None) -> None:
    import time

    with open(out.parent / "builds.log", "a") as fh:
        fh.write("build\n")
    time.sleep(0.5)
    for role in fam_mod.ROLES:
        (out / role).mkdir()
        (out / role / "config.json").write_text("{}")
    (out / fam_mod.CHAT_ROLE / fam_mod.CHAT_MARKER).write_text(json.dumps({**fam_mod._chat_marker(seed), "sha256": ""}))
    (out / fam_mod.MARKER).write_text(json.dumps(fam_mod._marker(seed)))


def _call_ensure(root: str, q) -> None:
    fam_mod.build_family = _fake_build  # this process's copy of the module (spawned fresh)
    q.put(str(fam_mod.ensure_demo_family(root, seed=0).root))


def test_concurrent_ensure_builds_once(tmp_path: Path) -> None:
    root = tmp_path / "fam"
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_call_ensure, args=(str(root), q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    roots = {q.get(timeout=5) for _ in procs}
    assert roots == {str(root)}
    assert (tmp_path / "builds.log").read_text() == "build\n"
    assert not list(tmp_path.glob(".fam.tmp-*"))  # no temp dirs left behind


def test_ensure_refuses_foreign_or_mismatched_dirs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fam_mod, "build_family", _fake_build)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "something").write_text("x")
    with pytest.raises(FileExistsError):
        fam_mod.ensure_demo_family(foreign)
    built = fam_mod.ensure_demo_family(tmp_path / "ok", seed=0)
    assert set(built.paths) == set(fam_mod.ROLES) and built.seed == 0
    with pytest.raises(ValueError):
        fam_mod.ensure_demo_family(tmp_path / "ok", seed=1)
    # A failed build leaves nothing behind.
    monkeypatch.setattr(fam_mod, "build_family", lambda out, seed=0, log=None: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fam_mod.ensure_demo_family(tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.tmp-*"))


def test_default_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EFT_DEMO_DIR", raising=False)
    d = fam_mod.default_cache_dir(3)
    assert d.name == f"demo-v{FORMAT_VERSION}-{build_spec_hash()[:8]}-seed3"
    assert d.parent == Path.home() / ".cache" / "eft-serve"
    monkeypatch.setenv("EFT_DEMO_DIR", str(tmp_path / "x"))
    assert fam_mod.default_cache_dir(3) == tmp_path / "x"


def test_build_spec_hash_and_marker_are_stable() -> None:
    # The hash names existing cache dirs and is in their completion markers (under the v1 key
    # "recipe"): changing either must be deliberate, or every built family is rebuilt or refused.
    assert (
        BUILD_SPEC.sha256() == build_spec_hash() == "335a76e3c2bec266def928dd804ad0866a491898ccdb7e0e39ae928169ef23a3"
    )
    assert fam_mod._marker(0) == {"format_version": 1, "recipe": build_spec_hash(), "seed": 0}
