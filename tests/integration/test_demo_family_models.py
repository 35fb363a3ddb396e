"""The trained demo family itself: its layout, fingerprint and what the models learned.

Uses the family built once per session (and cached across runs) by the `demo_family` fixture of
tests/conftest.py; the fast checks of the world, tokenizer and build cache are unit tests
(tests/unit/test_demo_family.py).
"""

from __future__ import annotations

import pytest

from eft_serve.demo import family as fam_mod
from eft_serve.demo.world import World

# ---- the real family (built once per session by tests/conftest.py's `demo_family`) ------------


@pytest.fixture(scope="module")
def loaded(demo_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    toks = {r: AutoTokenizer.from_pretrained(str(p)) for r, p in demo_family.paths.items()}
    models = {r: AutoModelForCausalLM.from_pretrained(str(p)).eval() for r, p in demo_family.paths.items()}
    return toks, models


def test_family_layout_and_fingerprint(demo_family) -> None:
    assert set(demo_family.paths) == set(fam_mod.ROLES)
    assert (demo_family.root / fam_mod.MARKER).is_file()
    fp = demo_family.fingerprint()
    assert fp["seed"] == demo_family.seed and fp["format_version"] == fam_mod.FORMAT_VERSION
    for role, path in demo_family.paths.items():
        assert list(path.glob("*.safetensors")), role
        assert fp["roles"][role]["sha256"] == fam_mod.weights_sha256(path)
    assert len({fp["roles"][r]["sha256"] for r in fam_mod.ROLES}) == len(fam_mod.ROLES)
    # Cached: a second call does not rebuild.
    again = fam_mod.ensure_demo_family(demo_family.root, seed=demo_family.seed)
    assert again.paths == demo_family.paths


def test_all_roles_load_and_share_one_vocab(demo_family, loaded) -> None:
    toks, models = loaded
    vocab = toks["small_base"].get_vocab()
    tok_json = (demo_family.paths["small_base"] / "tokenizer.json").read_bytes()
    for role in fam_mod.ROLES:
        assert toks[role].get_vocab() == vocab
        assert (demo_family.paths[role] / "tokenizer.json").read_bytes() == tok_json
        cfg = models[role].config
        assert cfg.vocab_size == len(vocab) and cfg.eos_token_id == toks[role].eos_token_id
        assert cfg.n_positions == 256
    small, large = models["small_base"].config, models["large_base"].config
    for role in ("small_ft", "small_ft_b"):
        c = models[role].config
        assert (c.n_layer, c.n_embd, c.n_head) == (small.n_layer, small.n_embd, small.n_head)
    assert models["large_ft"].config.n_embd == large.n_embd
    assert large.n_layer > small.n_layer and large.n_embd > small.n_embd


def test_large_base_knows_more_and_upscaling_combines_knowledge_with_style(demo_family, loaded) -> None:
    from eft_serve.demo.train import evaluate

    toks, m = loaded
    tok, world = toks["small_base"], demo_family.world
    r = {
        role: evaluate([(m[role], 1.0)], tok, world) for role in ("small_base", "large_base", "small_ft", "small_ft_b")
    }
    up_a = evaluate([(m["large_base"], 1.0), (m["small_ft"], 1.0), (m["small_base"], -1.0)], tok, world)
    # Knowledge: the large base memorised the held-out facts, the small base did not.
    assert r["large_base"]["accuracy"] >= 0.8 > 0.5 >= r["small_base"]["accuracy"]
    assert r["large_base"]["style_plain"] >= 0.9 and r["small_base"]["style_plain"] >= 0.9
    # Behaviour: the small experts have their styles (but the small model's knowledge).
    assert r["small_ft"]["style_a"] >= 0.9 and r["small_ft_b"]["style_b"] >= 0.9
    assert r["small_ft"]["accuracy"] <= 0.5
    # Up-scaling: large knowledge in style A.
    assert up_a["style_a"] >= 0.9 and up_a["accuracy"] >= 0.8


@pytest.fixture(scope="module")
def tokenizer():
    from eft_serve.demo.tokenizer import train_tokenizer

    return train_tokenizer(World.from_seed(0))


def test_training_is_bit_reproducible_and_restores_threads(tokenizer) -> None:
    import torch

    from eft_serve.demo import train

    w = World.from_seed(0)
    spec = train.ModelSpec(n_layer=1, n_embd=32, n_head=2)
    cfg = train.PretrainConfig(epochs=1, lr=3e-3, batch_size=16, warmup_steps=5)
    threads = torch.get_num_threads()
    m1, s1 = train.pretrain(w, tokenizer, spec, cfg, seed=7)
    assert torch.get_num_threads() == threads
    m2, _ = train.pretrain(w, tokenizer, spec, cfg, seed=7)
    f1, _ = train.finetune(m1, w, tokenizer, "a", train.FinetuneConfig(epochs=1), seed=3)
    f2, _ = train.finetune(m2, w, tokenizer, "a", train.FinetuneConfig(epochs=1), seed=3)
    for a, b in ((m1, m2), (f1, f2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert s1.steps > 0 and s1.final_loss < 7
    assert any(not torch.equal(m1.state_dict()[k], f1.state_dict()[k]) for k in m1.state_dict())
