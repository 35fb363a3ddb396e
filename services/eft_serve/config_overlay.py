"""Config overlays: a user's partial YAML merged over the built-in defaults, and one-line errors.

Owns the merge rule and the error text. Mappings merge key by key, recursively (so `pools` and
`recipes`, keyed by name, merge per pool and per recipe: a new name adds one). Lists, scalars and
`null` replace. A top-level `replace: [PATH, ...]` (dotted key paths, e.g. `pools`, `recipes`,
`pools.large_base`) makes the file's value at each PATH replace the default whole instead.
Also turns a pydantic `ValidationError` into one readable line naming each key path.

Does NOT know the schema or the defaults: `config.load_config` passes both in as plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

__all__ = ["REPLACE_KEY", "ConfigError", "merge_overlay", "split_replace", "describe_validation_error"]

REPLACE_KEY = "replace"
# Enough to fix a file in one go without a wall of text.
_MAX_ERRORS = 5

Path_ = tuple[str, ...]


class ConfigError(ValueError):
    """A config file that cannot be used; the message is one line naming the file and key paths."""


def split_replace(overlay: Mapping[str, Any], source: str) -> tuple[dict[str, Any], frozenset[Path_]]:
    """The overlay without its `replace` key, and the key paths that key names.

    Every path must be one the file sets: a misspelt `replace: [pols]` must not silently merge.
    """
    data = dict(overlay)
    raw = data.pop(REPLACE_KEY, [])
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        raise ConfigError(f"{source}: {REPLACE_KEY}: must be a list of dotted key paths, e.g. [pools, recipes]")
    paths = frozenset(tuple(p.split(".")) for p in raw)
    for path in sorted(paths):
        node: Any = data
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                raise ConfigError(
                    f"{source}: {REPLACE_KEY}: {'.'.join(path)!r} is not a key this file sets "
                    "(replace names keys whose value in this file replaces the default whole)"
                )
            node = node[key]
    return data, paths


def merge_overlay(
    defaults: Mapping[str, Any], overlay: Mapping[str, Any], replace: frozenset[Path_] = frozenset()
) -> dict[str, Any]:
    """`defaults` with `overlay` merged in (neither is modified)."""
    return _merge(defaults, overlay, replace, ())


def _merge(base: Mapping[str, Any], over: Mapping[str, Any], replace: frozenset[Path_], path: Path_) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        here = (*path, str(key))
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping) and here not in replace:
            out[key] = _merge(old, value, replace, here)
        else:
            out[key] = value
    return out


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line: `source: a.b.c: problem; d.e: problem`, unknown keys as `a.b: unknown key`."""
    parts: list[str] = []
    unknown = False
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            unknown = True
            what = "unknown key"
        else:
            what = str(err["msg"]).removeprefix("Value error, ").replace("\n", " ")
            value = err.get("input")
            if err["type"] != "missing" and (value is None or isinstance(value, (str, int, float, bool))):
                what += f" (got {value!r})"
        parts.append(f"{where}: {what}" if where else what)
    more = len(parts) - _MAX_ERRORS
    text = "; ".join(parts[:_MAX_ERRORS]) + (f"; and {more} more" if more > 0 else "")
    hint = " (`eft config show` prints every key)" if unknown else ""
    return f"{source}: {text}{hint}"
