"""The playground's static files ship in the package: setuptools' `package-data` of `eft_serve` (in
pyproject.toml, globs relative to the package directory, as setuptools expands them) matches each
file the page route serves, and the static folder holds nothing else (nothing shipped unserved)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from eft_serve.playground.routes import FILES

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "services" / "eft_serve"
STATIC = PACKAGE / "playground" / "static"


def _shipped() -> set[Path]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "services" in setuptools["packages"]["find"]["where"]
    found: set[Path] = set()
    for pattern in setuptools["package-data"]["eft_serve"]:
        found.update(p for p in PACKAGE.glob(pattern) if p.is_file())
    return found


def test_the_five_static_files_are_package_data() -> None:
    assert sorted(FILES) == sorted(["index.html", "api.js", "tokens.js", "playground.js", "playground.css"])
    shipped = _shipped()
    for name in FILES:
        assert STATIC / name in shipped, f"{name} is not in eft_serve's package-data (pyproject.toml)"
    assert {p.name for p in STATIC.iterdir()} == set(FILES)  # the route serves everything there
