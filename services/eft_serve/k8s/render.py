"""The command line that renders the committed `k8s/` tree: `python -m eft_serve.k8s.render`.

Layout produced: `k8s/base/` (a complete, namespace-free stack from `settings/base.yaml`),
`k8s/overlays/<name>/` either a kustomize overlay on that base (`OverlaySettings`: namespace +
dev Secret) or a complete stack of its own (`StackSettings`, e.g. prod: the serveConfigV2
string and the worker groups differ wholesale, and kustomize cannot patch inside a string).

Owns: argument parsing, finding the checkout (`--root`, default: walk up from the current
directory), writing, and the `--check` convention shared by every generated artifact: render in
memory, compare with the committed files, exit 1 naming each drifted file and the command that
regenerates it, exit 0 when in sync. Does NOT know how anything is rendered: see `files`
(settings -> files), `stack` and `manifests` (objects), `checks`, `settings`; nor validation
(`k8s.validate`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from eft_serve.k8s.constants import RENDER_COMMAND
from eft_serve.k8s.files import drift, render_named, write_files
from eft_serve.k8s.layout import RepoRootNotFound, all_names, find_repo_root, output_dir


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=RENDER_COMMAND, description="Render k8s/ manifests from k8s/settings/*.yaml and deploy/*.yaml."
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--overlay", help="settings name: base, dev, prod, ...")
    which.add_argument("--all", action="store_true", help="every k8s/settings/*.yaml into its k8s/ directory")
    p.add_argument("--out", type=Path, help="output directory (default: k8s/base or k8s/overlays/<name>)")
    p.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 naming each file that differs from a fresh render"
    )
    p.add_argument(
        "--root",
        type=Path,
        help="repository root (default: the nearest directory at or above "
        "the current one holding pyproject.toml and k8s/)",
    )
    args = p.parse_args(argv)
    try:
        root = (args.root or find_repo_root()).resolve()
    except RepoRootNotFound as e:
        p.error(str(e))
    names = all_names(root) if args.all else [args.overlay]
    if args.out and len(names) != 1:
        p.error("--out needs --overlay")
    if args.check:
        problems = [line for name in names for line in drift(root, name, args.out)]
        if problems:
            regenerate = " ".join(
                [
                    RENDER_COMMAND,
                    "--all" if args.all else f"--overlay {args.overlay}",
                    *([f"--out {args.out}"] if args.out else []),
                    *([f"--root {args.root}"] if args.root else []),
                ]
            )
            print("\n".join(problems), file=sys.stderr)
            print(f"regenerate with: {regenerate}", file=sys.stderr)
            return 1
        print(f"k8s manifests up to date: {', '.join(names)}")
        return 0
    for name in names:
        out = args.out or output_dir(root, name)
        write_files(out, render_named(root, name))
        print(f"rendered {name} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
