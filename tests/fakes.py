"""Test helpers: a character tokenizer and fake-engine pools (fakes only ever stand in for a *model*)."""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

from eft_serve.auth.keys import KeyStore, load_key_store
from eft_serve.cache.next_token_cache import NextTokenCache
from eft_serve.config import CoordinatorConfig, RecipeConfig
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.testing.fake_engine import FakeEngine
from eft_serve.transport.inprocess import InProcessPool

CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,!?"  # 67 chars
VOCAB = len(CHARS) + 1  # + EOS
EOS = VOCAB - 1


class CharTokenizer:
    """One character per token; id VOCAB-1 is EOS."""

    eos_token_id = EOS

    def __len__(self) -> int:
        return VOCAB

    def encode(self, text: str) -> list[int]:
        return [CHARS.index(c) for c in text if c in CHARS]

    def decode(
        self, ids: Sequence[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False
    ) -> str:
        return "".join(CHARS[i] for i in ids if i != EOS)


RECIPES = {
    "upscale": RecipeConfig(base="large_base", experts=["small_ft"], reference="small_base"),
    "large_base": RecipeConfig(base="large_base"),
    "interpolate": RecipeConfig(
        base="large_base",
        experts=["small_ft", "small_ft_b"],
        reference="small_base",
        default_weights={"small_ft": 1.0, "small_ft_b": 0.0},
    ),
}


def fake_engines(vocab: int = VOCAB, **overrides: FakeEngine) -> dict[str, FakeEngine]:
    engines = {
        "large_base": FakeEngine(vocab, seed=1, name="large_base", eos_token_id=EOS, max_context=96),
        "small_base": FakeEngine(vocab, seed=2, name="small_base", eos_token_id=EOS, max_context=96),
        "small_ft": FakeEngine(vocab, seed=3, name="small_ft", eos_token_id=EOS, max_context=96),
        "small_ft_b": FakeEngine(vocab, seed=4, name="small_ft_b", eos_token_id=EOS, max_context=96),
    }
    engines.update(overrides)
    return engines


def fake_coordinator(engines: dict[str, FakeEngine] | None = None, cache=None, **cfg) -> EftCoordinator:
    engines = engines or fake_engines()
    pools = {role: InProcessPool(e, role) for role, e in engines.items()}
    config = CoordinatorConfig(**{"max_new_tokens_cap": 64, "default_max_new_tokens": 16, **cfg})
    return EftCoordinator(
        pools, RECIPES, CharTokenizer(), config, cache=NextTokenCache(cache) if cache is not None else None
    )


# The fakes' recipes plus one single-model recipe per role: the playground's columns.
PLAYGROUND_RECIPES = {
    **RECIPES,
    "small_ft": RecipeConfig(description="the small fine-tune alone", base="small_ft"),
    "small_base": RecipeConfig(description="the small base alone", base="small_base"),
    "small_ft_b": RecipeConfig(base="small_ft_b"),
}


def playground_coordinator() -> tuple[EftCoordinator, dict[str, FakeEngine]]:
    engines = fake_engines()
    pools = {role: InProcessPool(e, role) for role, e in engines.items()}
    config = CoordinatorConfig(max_new_tokens_cap=64, default_max_new_tokens=16, pool_call_retries=0)
    return EftCoordinator(pools, PLAYGROUND_RECIPES, CharTokenizer(), config), engines


def counting_key_store(path: Path) -> tuple[KeyStore, list[str]]:
    """The key store of `path` with every lookup (one authentication) recorded in the list."""
    store = load_key_store(path, None)
    lookups: list[str] = []
    real_lookup = store.lookup

    def counting_lookup(raw: str):
        lookups.append(raw)
        return real_lookup(raw)

    store.lookup = counting_lookup  # type: ignore[method-assign]
    return store, lookups
