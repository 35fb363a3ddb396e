"""Several LoRA fine-tunes over one base (issue 18): two adapters co-located in the small base's
pool, both experts of one multi-expert recipe.

In process: the host engine serves the base and both adapters; exact greedy decoding must equal
the independent reference run on each adapter merged into its base (`merge_and_unload`), at two
pool calls a token (the host answers its own rows and both adapters' in one call). Config path:
`pools.<role>.colocate_with` on both roles renders one host application carrying both adapters,
none of their own, and the coordinator deployment's pool clients are a `ColocatedRole` per
adapter over the host's client (checked without starting Ray).
"""

from __future__ import annotations

import pytest

from eft_serve.adapters import lora_links
from eft_serve.config import CoordinatorConfig, EftConfig, PoolConfig, RecipeConfig
from eft_serve.coordinator.pool_client import ColocatedRole
from eft_serve.coordinator.request import GenerationRequest, MergeOptions
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.engine.hf_engine import HFEngine
from eft_serve.reference import ReferenceEFT
from eft_serve.serve.app import pool_app, pool_apps, serve_config
from eft_serve.serve.config_check import check_serve_config
from eft_serve.serve.coordinator_deployment import coordinator_pools
from eft_serve.testing.arch_families import build_arch_family, demo_tokenizer
from eft_serve.testing.lora_fixtures import make_lora_adapter, merged_model_dir
from eft_serve.transport.inprocess import InProcessPool

ADAPTERS = ("ft_a", "ft_b")
WEIGHTS = {"ft_a": 1.0, "ft_b": 0.5}
RECIPES = {
    "multi": RecipeConfig(base="large_base", experts=list(ADAPTERS), reference="small_base", default_weights=WEIGHTS),
    "ft_b": RecipeConfig(base="ft_b"),
}
COEFFICIENTS = {"large_base": 1.0, "ft_a": 1.0, "ft_b": 0.5, "small_base": -1.5}
PROMPTS = ["Q: Where does the", "The capital of", "A: It is"]
N = 12


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_lora")
    tokenizer = demo_tokenizer()
    fam = build_arch_family("llama", root / "family", tokenizer=tokenizer)
    base = fam.paths["small_base"]
    adapters = {name: make_lora_adapter(base, root / name, seed=seed, std=0.3) for name, seed in zip(ADAPTERS, (1, 2))}
    merged = {name: merged_model_dir(base, d, root / f"{name}_merged") for name, d in adapters.items()}
    return {"family": fam, "adapters": adapters, "merged": merged, "tokenizer": tokenizer}


async def _greedy(coord: EftCoordinator, prompt: str, recipe: str) -> tuple[list[int], int]:
    stream = await coord.generate(
        GenerationRequest(
            prompt=prompt,
            merge=MergeOptions(recipe=recipe, logprob_top_k=0),
            temperature=0,
            max_new_tokens=N,
            ignore_eos=True,
        )
    )
    chunks = [c async for c in stream]
    return [t.token_id for c in chunks for t in c.tokens], chunks[-1].usage.fetch.pool_calls


async def test_two_colocated_adapters_in_one_recipe_equal_the_merged_reference(family) -> None:
    fam, tokenizer = family["family"], family["tokenizer"]
    host = InProcessPool(
        HFEngine.load(fam.paths["small_base"], name="small_base", device="cpu", adapters=family["adapters"]),
        "small_base",
    )
    large = InProcessPool(HFEngine.load(fam.paths["large_base"], name="large_base", device="cpu"), "large_base")
    pools = {"large_base": large, "small_base": host, **{a: ColocatedRole(a, host) for a in ADAPTERS}}
    coord = EftCoordinator(pools, RECIPES, tokenizer, CoordinatorConfig(default_recipe="multi", max_new_tokens_cap=64))
    await coord.start()
    try:
        prints = {r: coord.infos[r].model_fingerprint for r in ("small_base", *ADAPTERS)}
        assert len(set(prints.values())) == 3  # each adapter is its own weights (cache keys too)
        paths = {"large_base": fam.paths["large_base"], "small_base": fam.paths["small_base"], **family["merged"]}
        reference = ReferenceEFT(paths, COEFFICIENTS, support=len(tokenizer))
        # Each adapter matters: with the second one replaced by its plain base the output differs.
        without_b = ReferenceEFT({**paths, "ft_b": fam.paths["small_base"]}, COEFFICIENTS, support=len(tokenizer))
        differs = 0
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            expected, _ = reference.greedy(ids, N)
            differs += expected != without_b.greedy(ids, N)[0]
            got, pool_calls = await _greedy(coord, prompt, "multi")
            assert got == expected, prompt
            assert pool_calls == 2 * N  # the large base's call and one host call with both adapters
        assert differs, "the second adapter changed no greedy output: the test would not see it ignored"
        # The second adapter alone matches its merged model.
        alone = ReferenceEFT({"ft_b": family["merged"]["ft_b"]}, {"ft_b": 1.0}, support=len(tokenizer))
        got, _ = await _greedy(coord, PROMPTS[0], "ft_b")
        assert got == alone.greedy(tokenizer.encode(PROMPTS[0]), N)[0]
    finally:
        await coord.stop()


def test_colocate_with_on_two_roles_builds_one_host_with_both_adapters(family) -> None:
    fam, adapters = family["family"], family["adapters"]
    cfg = EftConfig(
        pools={
            "large_base": PoolConfig(model=str(fam.paths["large_base"])),
            "small_base": PoolConfig(model=str(fam.paths["small_base"])),
            **{a: PoolConfig(model=str(adapters[a]), colocate_with="small_base") for a in ADAPTERS},
        },
        recipes=RECIPES,
        coordinator={"default_recipe": "multi"},
    )
    apps = {a["role"]: a for a in pool_apps(cfg)}
    assert set(apps) == {"large_base", "small_base"}
    assert apps["small_base"]["lora"] == {"adapters": {a: str(adapters[a]) for a in ADAPTERS}}
    assert "lora" not in apps["large_base"]
    pool_app(apps["small_base"])  # the builder accepts what pool_apps renders (no Ray needed)
    rendered = serve_config(cfg)
    names = [a["name"] for a in rendered["applications"]]
    assert sorted(names) == ["eft", "pool-large_base", "pool-small_base"]
    assert check_serve_config(rendered) == []

    # The coordinator deployment's pools: a client per deployed pool, a ColocatedRole per adapter.
    class Client:
        def __init__(self, role: str) -> None:
            self.role = role

    pools = coordinator_pools(cfg, lora_links(cfg), Client)
    assert set(pools) == {"large_base", "small_base", *ADAPTERS}
    assert isinstance(pools["small_base"], Client) and isinstance(pools["large_base"], Client)
    for a in ADAPTERS:
        role = pools[a]
        assert isinstance(role, ColocatedRole) and role.host is pools["small_base"] and role.adapter == a
