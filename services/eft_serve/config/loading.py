"""The built-in demo stack and YAML loading: a config file is an overlay over that stack.

Owns `demo_config` (the demo family's pools and the up-scaling recipes), `load_config` (YAML ->
overlay merge, `config_overlay` -> validated `EftConfig`, one-line `ConfigError`s) and the
`demo:` model scheme. Knows nothing of how the tree is executed.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from eft_serve.config.pool import PoolConfig
from eft_serve.config.recipe import PromptTemplate, RecipeConfig
from eft_serve.config.tree import EftConfig
from eft_serve.config_overlay import ConfigError, describe_validation_error, merge_overlay, split_replace
from eft_serve.demo.world import QA_TEMPLATE

DEMO_SCHEME = "demo:"


def _upscale_recipes(with_large_ft: bool, with_expert_b: bool, with_chat: bool = False) -> dict[str, RecipeConfig]:
    recipes = {
        "upscale": RecipeConfig(
            description="LM up-scaling: large base steered by the small fine-tune's behaviour delta",
            base="large_base",
            experts=["small_ft"],
            reference="small_base",
        ),
        "large_base": RecipeConfig(description="the large base model alone", base="large_base"),
        "small_ft": RecipeConfig(description="the small fine-tuned model alone", base="small_ft"),
        "small_base": RecipeConfig(description="the small base model alone", base="small_base"),
    }
    if with_expert_b:
        recipes["interpolate"] = RecipeConfig(
            description="behaviour interpolation: two small experts over one reference, weights per request",
            base="large_base",
            experts=["small_ft", "small_ft_b"],
            reference="small_base",
            default_weights={"small_ft": 1.0, "small_ft_b": 0.0},
        )
        recipes["small_ft_b"] = RecipeConfig(description="the second small expert alone", base="small_ft_b")
    if with_large_ft:
        recipes["downscale"] = RecipeConfig(
            description="down-scaling: small base steered by the large fine-tune's behaviour delta",
            base="small_base",
            experts=["large_ft"],
            reference="large_base",
        )
        recipes["large_ft"] = RecipeConfig(
            description="the large fine-tuned model alone (ground truth)", base="large_ft"
        )
    if with_chat:
        # The chat expert sees chat requests in its own chat template ("own", the default); the
        # bases have none and were pretrained on Q/A text, so they get it in that format.
        qa = PromptTemplate(template=QA_TEMPLATE)
        recipes["upscale_chat"] = RecipeConfig(
            description="LM up-scaling with a chat expert: each model sees a chat request in its own format",
            base="large_base",
            experts=["small_chat"],
            reference="small_base",
            prompt_format={"large_base": qa, "small_base": qa},
        )
        recipes["small_chat"] = RecipeConfig(description="the small chat expert alone", base="small_chat")
    return recipes


def demo_config(full_family: bool = False, with_chat: bool = False) -> EftConfig:
    """The built-in stack: the demo family's pools and the up-scaling recipes.

    `full_family` adds the second expert and the large fine-tune (interpolation, down-scaling).
    `with_chat` adds the chat expert (`small_chat`, recipes `small_chat` and `upscale_chat`;
    `deploy/demo_chat.yaml`). Each is opt-in: every pool is one more replica (a CPU) to start.
    """
    roles = ["large_base", "small_base", "small_ft"]
    if full_family:
        roles += ["small_ft_b", "large_ft"]
    if with_chat:
        roles += ["small_chat"]
    pools = {role: PoolConfig(model=f"{DEMO_SCHEME}{role}") for role in roles}
    for role, pool in pools.items():
        if role.startswith("small"):
            # One machine runs every pool here: the small engines take only CPU time the large
            # base's forward, the longest step of a token, leaves free (infra.cpu_scheduling).
            pool.replica.cpu_scheduling = "idle"
    return EftConfig(pools=pools, recipes=_upscale_recipes(full_family, full_family, with_chat))


def load_config(path: str | Path | None) -> EftConfig:
    """Load a YAML overlay over the built-in demo stack (`config_overlay`); `None` gives the stack.

    A full tree (deploy/*.yaml) loads as itself. Raises `ConfigError`, one line naming key paths.
    """
    if path is None:
        return demo_config()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    overlay, replace = split_replace(data, str(path))
    merged = merge_overlay(demo_config().model_dump(mode="json"), overlay, replace)
    try:
        return EftConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, str(path))) from None
