"""Offline check of a Serve config file (`serve deploy` / `serve run` / KubeRay `serveConfigV2`).

Owns: finding every problem in one Serve config dict before Ray sees it, as a list of messages
that name the offending key path. Three layers:

1. Ray's own schema (`ray.serve.schema.ServeDeploySchema`): types, enums, Ray's validators.
2. Unknown keys, walked recursively against the field names of Ray's pydantic models. Ray
   silently drops unknown keys, so a misspelled option (`max_ongoing_request`) would deploy
   with the default and nobody would notice.
3. Application `args`, validated by our own models: `EftConfig` for the coordinator app and
   `PoolConfig` + role for pool apps (see `serve/app.py`), plus cross-checks that the pool apps
   and the coordinator's config describe the same pools.

Does NOT know: Kubernetes, how the config was produced, or whether a cluster can run it
(resources, node groups: see `eft_serve.k8s.validate`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from eft_serve.config import EftConfig, PoolConfig
from eft_serve.serve.app import IMPORT_COORDINATOR, IMPORT_POOL
from eft_serve.serve.names import COORDINATOR_APP, pool_app_name

_POOL_ARGS = frozenset({"role", "pool", "lora"})
_COORDINATOR_ARGS = frozenset({"config"})


def check_serve_config(d: Any, check_imports: bool = True) -> list[str]:
    """Every problem found in the Serve config `d` (empty list = OK).

    `check_imports` also imports each application's `import_path` and each gRPC servicer
    function, which catches a renamed builder before a cluster does.
    """
    if not isinstance(d, dict):
        return [f"the Serve config must be a mapping, got {type(d).__name__}"]
    from ray.serve.schema import ServeDeploySchema

    problems = [_format_pydantic(e) for e in _pydantic_errors(ServeDeploySchema, d)]
    problems += list(unknown_keys(ServeDeploySchema, d))
    apps = d.get("applications")
    if isinstance(apps, list):
        problems += _check_apps(apps)
        if check_imports:
            problems += _check_imports(d)
    return problems


# ---------------------------------------------------------------- unknown keys (Ray's models)


def unknown_keys(model: type[BaseModel], data: Any, path: str = "") -> Iterator[str]:
    """Keys of `data` (recursively) that `model` and its nested models do not declare.

    Free-form fields (`args`, `runtime_env`, `user_config`, plain `dict` annotations) are not
    walked: they have no declared keys. `args` is checked separately against our own models.
    """
    if not isinstance(data, dict):
        return
    fields = _field_names(model)
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        name = fields.get(key)
        if name is None:
            known = ", ".join(sorted(fields))
            yield f"{where}: unknown key {key!r} ({model.__name__} accepts: {known})"
            continue
        annotation = model.model_fields[name].annotation
        for nested, is_list in _nested_models(annotation):
            if is_list and isinstance(value, list):
                for i, item in enumerate(value):
                    yield from unknown_keys(nested, item, f"{where}[{i}]")
            elif not is_list and isinstance(value, dict):
                yield from unknown_keys(nested, value, where)


def _field_names(model: type[BaseModel]) -> dict[str, str]:
    """Accepted key -> field name (aliases included)."""
    names: dict[str, str] = {}
    for name, field in model.model_fields.items():
        names[name] = name
        if field.alias:
            names[field.alias] = name
    return names


def _nested_models(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """The pydantic models an annotation can hold, each with whether it sits in a list.

    `Union[Dict, AutoscalingConfig]` counts as the model: Ray turns the dict into it.
    """
    found: list[tuple[type[BaseModel], bool]] = []

    def visit(tp: Any, in_list: bool) -> None:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            visit(typing.get_args(tp)[0], in_list)
        elif origin in (typing.Union, types.UnionType):
            for arg in typing.get_args(tp):
                visit(arg, in_list)
        elif origin in (list, tuple, set, frozenset, Sequence):
            for arg in typing.get_args(tp)[:1]:
                visit(arg, True)
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            found.append((tp, in_list))

    visit(annotation, False)
    return found


# ---------------------------------------------------------------- application args (our models)


def _check_apps(apps: list[Any]) -> list[str]:
    problems: list[str] = []
    # role -> (app index, its PoolConfig or None when that failed validation: reported already)
    pools: dict[str, tuple[int, PoolConfig | None]] = {}
    coordinator: tuple[int, EftConfig] | None = None
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            continue
        where = f"applications[{i}]"
        name, import_path, args = app.get("name"), app.get("import_path"), app.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            problems.append(f"{where}.args: must be a mapping")
            continue
        if import_path == IMPORT_POOL:
            problems += _unknown_args(args, _POOL_ARGS, f"{where}.args")
            role = args.get("role")
            if not isinstance(role, str) or not role:
                problems.append(f"{where}.args.role: a pool application needs its role (a string)")
                continue
            if name != pool_app_name(role):
                problems.append(
                    f"{where}.name: pool application for role {role!r} must be named "
                    f"{pool_app_name(role)!r} (the coordinator finds pools by that name), got {name!r}"
                )
            pools[role] = (i, _validated(PoolConfig, args.get("pool"), f"{where}.args.pool", problems))
        elif import_path == IMPORT_COORDINATOR:
            problems += _unknown_args(args, _COORDINATOR_ARGS, f"{where}.args")
            if name != COORDINATOR_APP:
                problems.append(
                    f"{where}.name: the coordinator application must be named {COORDINATOR_APP!r}, got {name!r}"
                )
            cfg = _validated(EftConfig, args.get("config"), f"{where}.args.config", problems)
            if cfg is not None:
                coordinator = (i, cfg)
        else:
            problems.append(
                f"{where}.import_path: {import_path!r} is none of our builders ({IMPORT_POOL}, {IMPORT_COORDINATOR})"
            )
    if coordinator is None:
        problems.append(f"applications: no coordinator application ({IMPORT_COORDINATOR})")
        return problems
    ci, cfg = coordinator
    # The coordinator talks to the pools it was configured with; a pool app that serves another
    # model (or none at all) fails only at run time, after the vocabulary check or a request.
    for role, pool in cfg.pools.items():
        if pool.colocate_with is not None:
            continue  # a co-located LoRA role rides in its base's pool application
        if role not in pools:
            problems.append(
                f"applications[{ci}].args.config.pools.{role}: no pool application "
                f"{pool_app_name(role)!r} serves this role"
            )
        elif pools[role][1] is not None and pools[role][1] != pool:
            problems.append(
                f"applications[{pools[role][0]}].args.pool: differs from the coordinator's "
                f"config.pools.{role} (render both from one EftConfig)"
            )
    for role, (i, _) in pools.items():
        if role not in cfg.pools:
            problems.append(f"applications[{i}]: pool role {role!r} is not in the coordinator's config.pools")
    return problems


def _unknown_args(args: dict[str, Any], allowed: frozenset[str], where: str) -> list[str]:
    # The builders read only their own keys; anything else would be silently ignored.
    return [
        f"{where}.{k}: unknown key {k!r} (accepted: {', '.join(sorted(allowed))})" for k in args if k not in allowed
    ]


def _validated(model: type[BaseModel], data: Any, where: str, problems: list[str]) -> Any:
    if data is None:
        problems.append(f"{where}: missing ({model.__name__} mapping)")
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems += [_format_pydantic(e, where) for e in exc.errors()]
        return None


# ---------------------------------------------------------------- helpers


def _pydantic_errors(model: type[BaseModel], data: Any) -> list[Any]:
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return list(exc.errors())
    return []


def _format_pydantic(err: Mapping[str, Any], prefix: str = "") -> str:
    parts = [prefix] if prefix else []
    for loc in err.get("loc", ()):
        if isinstance(loc, int) and parts:
            parts[-1] += f"[{loc}]"
        else:
            parts.append(str(loc))
    where = ".".join(parts) or "<root>"
    return f"{where}: {err.get('msg', 'invalid')}"


def _check_imports(d: dict[str, Any]) -> list[str]:
    problems = []
    targets = [
        (f"applications[{i}].import_path", a.get("import_path"), ":")
        for i, a in enumerate(d.get("applications") or [])
        if isinstance(a, dict)
    ]
    grpc = d.get("grpc_options") or {}
    targets += [
        (f"grpc_options.grpc_servicer_functions[{i}]", f, ".")
        for i, f in enumerate(grpc.get("grpc_servicer_functions") or [])
    ]
    for where, target, sep in targets:
        if not isinstance(target, str) or sep not in target:
            continue
        module, _, attr = target.rpartition(sep) if sep == "." else target.partition(sep)
        try:
            obj = importlib.import_module(module)
        except ImportError as exc:
            problems.append(f"{where}: cannot import {module!r}: {exc}")
            continue
        if not hasattr(obj, attr):
            problems.append(f"{where}: module {module!r} has no attribute {attr!r}")
    return problems


def load_serve_config(path: str | Path) -> Any:
    """A Serve config from a YAML file; a RayService manifest yields its `serveConfigV2`."""
    data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, dict) and data.get("kind") == "RayService":
        return yaml.safe_load((data.get("spec") or {}).get("serveConfigV2") or "")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eft_serve.serve.config_check",
        description="Check Serve config files (or RayService manifests) offline; exit 1 on any problem.",
    )
    parser.add_argument("files", nargs="+", help="Serve config YAML or RayService manifest")
    parser.add_argument("--no-imports", action="store_true", help="do not import builders/servicers")
    args = parser.parse_args(argv)
    failed = False
    for f in args.files:
        problems = check_serve_config(load_serve_config(f), check_imports=not args.no_imports)
        for p in problems:
            print(f"{f}: {p}")
        if not problems:
            print(f"{f}: OK")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
