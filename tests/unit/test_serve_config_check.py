"""check_serve_config: Ray's schema, unknown keys at any depth, and our own app args."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from eft_serve.config import demo_config
from eft_serve.serve.app import serve_config
from eft_serve.serve.config_check import check_serve_config, main, unknown_keys

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def sc() -> dict[str, Any]:
    return copy.deepcopy(serve_config(demo_config()))


def _app(sc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in sc["applications"] if a["name"] == name)


def test_rendered_configs_pass(sc: dict[str, Any]) -> None:
    assert check_serve_config(sc) == []
    assert check_serve_config(serve_config(demo_config(full_family=True))) == []
    assert check_serve_config(yaml.safe_load((ROOT / "deploy" / "serve_demo.yaml").read_text())) == []


def test_unknown_keys_are_found_at_every_level(sc: dict[str, Any]) -> None:
    sc["proxy_locaton"] = "HeadOnly"
    sc["grpc_options"]["prot"] = 1
    sc["http_options"]["hots"] = "0.0.0.0"
    app = _app(sc, "pool-small_ft")
    app["deployments"] = [
        {
            "name": "ModelPool",
            "max_ongoing_request": 4,  # the classic typo: Ray would deploy with the default
            "autoscaling_config": {"min_replica": 1},
            "ray_actor_options": {"num_gpu": 1},
        }
    ]
    problems = check_serve_config(sc)
    for needle in (
        "proxy_locaton: unknown key",
        "grpc_options.prot: unknown key",
        "http_options.hots: unknown key",
        "applications[2].deployments[0].max_ongoing_request: unknown key 'max_ongoing_request'",
        "applications[2].deployments[0].autoscaling_config.min_replica: unknown key",
        "applications[2].deployments[0].ray_actor_options.num_gpu: unknown key",
    ):
        assert any(needle in p for p in problems), (needle, problems)
    # The message lists the accepted names, so the fix is obvious.
    assert any("max_ongoing_requests" in p for p in problems if "max_ongoing_request:" in p)


def test_free_form_fields_are_not_walked(sc: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    app = _app(sc, "eft")
    app["runtime_env"] = {"env_vars": {"ANY": "thing"}, "whatever": 1}
    app["deployments"] = [{"name": "Coordinator", "user_config": {"free": {"form": 1}}}]
    assert list(unknown_keys(ServeDeploySchema, sc)) == []


def test_ray_schema_errors_are_reported(sc: dict[str, Any]) -> None:
    sc["proxy_location"] = "Nowhere"
    sc["grpc_options"]["port"] = "not-a-port"
    problems = check_serve_config(sc)
    assert any(p.startswith("proxy_location:") for p in problems)
    assert any(p.startswith("grpc_options.port:") for p in problems)


def test_app_args_are_validated_by_our_models(sc: dict[str, Any]) -> None:
    pool = _app(sc, "pool-large_base")
    pool["args"]["pool"]["kv_cache_byte"] = 1
    pool["args"]["extra"] = 1
    coord = _app(sc, "eft")
    coord["args"]["config"]["coordinatr"] = {}
    problems = check_serve_config(sc)
    assert "applications[0].args.pool.kv_cache_byte: Extra inputs are not permitted" in problems
    assert "applications[0].args.extra: unknown key 'extra' (accepted: lora, pool, role)" in problems
    assert "applications[3].args.config.coordinatr: Extra inputs are not permitted" in problems


def test_pool_apps_must_match_the_coordinators_pools(sc: dict[str, Any]) -> None:
    _app(sc, "pool-small_ft")["args"]["pool"]["model"] = "demo:small_ft_b"
    sc["applications"] = [a for a in sc["applications"] if a["name"] != "pool-small_base"]
    problems = check_serve_config(sc)
    assert any("applications[1].args.pool: differs from the coordinator's config.pools.small_ft" in p for p in problems)
    assert any("config.pools.small_base: no pool application 'pool-small_base'" in p for p in problems)


def test_names_import_paths_and_servicers(sc: dict[str, Any]) -> None:
    _app(sc, "pool-large_base")["name"] = "large"
    sc["applications"].append({"name": "other", "import_path": "somewhere:app", "route_prefix": "/x"})
    sc["grpc_options"]["grpc_servicer_functions"].append("eft_serve.serve.app.no_such_function")
    problems = check_serve_config(sc)
    assert any("must be named 'pool-large_base'" in p for p in problems)
    assert any("applications[4].import_path: 'somewhere:app' is none of our builders" in p for p in problems)
    assert any(
        "grpc_servicer_functions[2]: module 'eft_serve.serve.app' has no attribute 'no_such_function'" in p
        for p in problems
    )
    assert check_serve_config(["not", "a", "mapping"]) == ["the Serve config must be a mapping, got list"]


def test_main_exit_codes(sc: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(sc))
    assert main([str(good)]) == 0
    sc["applications"][0]["deployments"] = [{"name": "ModelPool", "max_ongoing_request": 4}]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(sc))
    assert main([str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{good}: OK" in out and "max_ongoing_request" in out
    # A RayService manifest is read through its serveConfigV2.
    assert main([str(ROOT / "k8s" / "overlays" / "prod" / "rayservice.yaml")]) == 0
