"""Where things live in a checkout: the repository root, `k8s/settings/` and the output folders.

Owns: `find_repo_root` (walk up from a directory, default the current one, to the first that
holds both `pyproject.toml` and `k8s/`), `settings_dir`, `output_dir` (`k8s/base` or
`k8s/overlays/<name>`) and `all_names` (the settings files present).
Does NOT know: what settings or manifests contain; imports nothing of the renderer, so the
validator can use it without pulling in Ray or the config tree.
"""

from __future__ import annotations

from pathlib import Path


class RepoRootNotFound(FileNotFoundError):
    """No directory at or above the start holds both `pyproject.toml` and `k8s/`."""


def find_repo_root(start: Path | None = None) -> Path:
    """The checkout containing `start` (default: the current directory), resolved.

    Deliberately not derived from this file's location: an installed package lives in
    site-packages, far from any checkout.
    """
    here = (start if start is not None else Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() and (d / "k8s").is_dir():
            return d
    raise RepoRootNotFound(
        f"no repository root at or above {here}: looked for a directory holding both pyproject.toml "
        "and k8s/; run from inside the checkout or pass --root"
    )


def settings_dir(root: Path) -> Path:
    return root / "k8s" / "settings"


def output_dir(root: Path, name: str) -> Path:
    return root / "k8s" / ("base" if name == "base" else f"overlays/{name}")


def overlays_dir(root: Path) -> Path:
    return root / "k8s" / "overlays"


def all_names(root: Path) -> list[str]:
    """Every settings name (`k8s/settings/<name>.yaml`), sorted."""
    return sorted(p.stem for p in settings_dir(root).glob("*.yaml"))
