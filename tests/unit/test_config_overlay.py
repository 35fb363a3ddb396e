"""`--config FILE` is an overlay: only the keys a user changes, merged over the built-in defaults.

Mappings merge (pools and recipes per name), lists and scalars replace, `replace: [PATH]` takes a
subtree whole; unknown keys fail in one line naming the key path; `eft config show` prints the tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from eft_serve.cli import main
from eft_serve.config import EftConfig, demo_config, load_config
from eft_serve.config_overlay import ConfigError, merge_overlay

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: Any, name: str = "my.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_readme_auth_example_overlays_the_demo_stack(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "auth: {enabled: true, keys_file: keys.yaml}\n"))
    assert cfg.auth.enabled and cfg.auth.keys_file == "keys.yaml"
    # Everything the file does not name is the built-in default.
    assert cfg.model_copy(update={"auth": demo_config().auth}) == demo_config()


def test_a_pool_key_overrides_that_pool_only_and_keeps_its_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"pools": {"large_base": {"model": "/x", "replica": {"num_cpus": 2}}}}))
    large = cfg.pools["large_base"]
    assert large.model == "/x" and large.replica.num_cpus == 2
    # The default pool's own replica default (64 calls in flight), not ReplicaConfig's 16.
    assert large.replica.max_ongoing_requests == 64 == demo_config().pools["large_base"].replica.max_ongoing_requests
    assert cfg.pools["small_base"] == demo_config().pools["small_base"]
    assert set(cfg.pools) == set(demo_config().pools) and cfg.recipes == demo_config().recipes


def test_a_new_pool_and_recipe_are_added_and_lists_replace(tmp_path: Path) -> None:
    data = {
        "pools": {"small_ft_b": {"model": "/y", "replica": {"cpu_affinity": [1]}}},
        "recipes": {
            "upscale": {"experts": ["small_ft_b"]},  # a list: replaces [small_ft], never appends
            "mine": {"base": "large_base", "experts": ["small_ft", "small_ft_b"], "reference": "small_base"},
        },
    }
    cfg = load_config(write(tmp_path, data))
    assert set(cfg.pools) == {*demo_config().pools, "small_ft_b"} and cfg.pools["small_ft_b"].model == "/y"
    assert cfg.recipes["upscale"].experts == ["small_ft_b"]
    assert cfg.recipes["upscale"].reference == "small_base"  # kept from the default recipe
    assert cfg.recipes["mine"].roles() == ["large_base", "small_ft", "small_ft_b", "small_base"]
    # Overriding a list inside a merged pool replaces it too.
    data = {"pools": {"large_base": {"replica": {"cpu_affinity": [0, 1]}}}}
    two = load_config(write(tmp_path, data)).pools["large_base"].replica.cpu_affinity
    data["pools"]["large_base"]["replica"]["cpu_affinity"] = [3]
    assert two == [0, 1] and load_config(write(tmp_path, data)).pools["large_base"].replica.cpu_affinity == [3]


def test_replace_takes_the_files_pools_and_recipes_whole(tmp_path: Path) -> None:
    data: dict[str, Any] = {
        "pools": {"big": {"model": "/models/big"}, "tiny": {"model": "/models/tiny"}},
        "recipes": {"big": {"base": "big"}, "tiny": {"base": "tiny"}},
        "coordinator": {"default_recipe": "big"},
    }
    merged = load_config(write(tmp_path, data))
    assert set(merged.pools) == {"big", "tiny", *demo_config().pools}  # merging keeps the demo pools
    cfg = load_config(write(tmp_path, {**data, "replace": ["pools", "recipes"]}))
    assert set(cfg.pools) == {"big", "tiny"} and set(cfg.recipes) == {"big", "tiny"}
    assert cfg.coordinator.default_recipe == "big" and cfg.coordinator.max_new_tokens_cap == 512
    # A dotted path replaces one subtree: the demo's settings of that small pool's replica
    # (cpu_scheduling: idle) are not inherited; a pool replica's schema defaults apply.
    one: dict[str, Any] = {"pools": {"small_base": {"replica": {"num_cpus": 2}}}}
    assert load_config(write(tmp_path, one)).pools["small_base"].replica.cpu_scheduling == "idle"
    one["replace"] = ["pools.small_base.replica"]
    replica = load_config(write(tmp_path, one)).pools["small_base"].replica
    assert replica.cpu_scheduling == "normal" and replica.num_cpus == 2 and replica.max_ongoing_requests == 64


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"replace": ["pols"], "pools": {}}, "replace: 'pols' is not a key this file sets"),
        ({"replace": ["pools.huge"], "pools": {"large_base": {"model": "/m"}}}, "'pools.huge' is not a key"),
        ({"replace": "pools", "pools": {}}, "replace: must be a list of dotted key paths"),
    ],
)
def test_replace_names_only_keys_the_file_sets(tmp_path: Path, data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("coordinator: {speculativ: {enabled: true}}\n", "coordinator.speculativ: unknown key"),
        ("pools: {large_base: {replica: {max_ongoing_request: 3}}}\n", "pools.large_base.replica.max_ongoing_request"),
        ("pools: {large_base: {dtype: fp8}}\n", "pools.large_base.dtype: Input should be"),
        ("coordinatr: {}\n", "coordinatr: unknown key"),
        ("auth: {enabled: true}\n", "auth: auth.enabled needs auth.keys_file or auth.keys_env"),
        ("recipes: {upscale: {experts: [nobody]}}\n", "recipe 'upscale' uses roles without a pool: ['nobody']"),
    ],
)
def test_errors_are_one_line_naming_the_key_path(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message
    if "dtype" in expected:
        assert "(got 'fp8')" in message


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(write(tmp_path, "pools: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("name", ["demo.yaml", "demo_chat.yaml", "prod.yaml", "k8s-dev.yaml"])
def test_full_deploy_files_load_as_themselves(name: str) -> None:
    path = ROOT / "deploy" / name
    assert load_config(path) == EftConfig.model_validate(yaml.safe_load(path.read_text()))


def test_merge_copies_and_null_replaces() -> None:
    defaults = {"a": {"b": 1, "c": [1, 2]}, "d": {"e": 1}}
    overlay = {"a": {"c": [3]}, "d": None}
    assert merge_overlay(defaults, overlay) == {"a": {"b": 1, "c": [3]}, "d": None}
    assert defaults == {"a": {"b": 1, "c": [1, 2]}, "d": {"e": 1}} and overlay == {"a": {"c": [3]}, "d": None}


def test_config_show_prints_the_effective_tree_which_loads_as_itself(tmp_path: Path, capsys) -> None:
    overlay = write(tmp_path, {"coordinator": {"speculative": {"enabled": True}}, "grpc": {"port": 9100}})
    assert main(["config", "show", "--config", str(overlay)]) == 0
    shown = capsys.readouterr().out
    expected = load_config(overlay)
    assert expected.coordinator.speculative.enabled and expected.grpc.port == 9100
    assert yaml.safe_load(shown) == expected.model_dump(mode="json")
    assert load_config(write(tmp_path, shown, "shown.yaml")) == expected
    assert main(["config", "show"]) == 0
    assert EftConfig.model_validate(yaml.safe_load(capsys.readouterr().out)) == demo_config()


def test_cli_prints_a_config_error_as_one_line_and_exits_2(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "coordinator: {speculativ: {enabled: true}}\n")
    assert main(["config", "show", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"error: {path}: coordinator.speculativ: unknown key (`eft config show` prints every key)"
    ]


def test_serve_takes_the_readme_overlay(tmp_path: Path, capsys) -> None:
    # Partial file through `eft serve`: it gets as far as reading the keys file (exit 2, nothing started).
    path = write(tmp_path, {"auth": {"enabled": True, "keys_file": str(tmp_path / "keys.yaml")}})
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "eft keys add" in err and "Field required" not in err
