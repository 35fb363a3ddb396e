"""Every shell command in README.md and every page under docs/ works as written on a clone.

The shell blocks are extracted and split the way bash would (quotes spanning lines, `\\`
continuations, `#` comments). Commands that run offline in seconds (`eft --help`, `eft plan`,
`eft config show`) are run; every other `eft` command is parsed by the CLI's own parser, so a
renamed subcommand or flag fails here; scripts, benchmark files and modules they name must exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from eft_serve.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
RUNNABLE = {"--help", "plan", "config"}  # offline, in seconds, with no side effects
EFT = {".venv/bin/eft", "eft"}
_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.M | re.S)


def commands(text: str) -> list[list[str]]:
    """The commands of every bash block of a markdown text, each as bash would split it."""
    out: list[list[str]] = []
    for block in _BLOCK.findall(text):
        buf = ""
        for line in block.splitlines():
            buf += line + "\n"
            if buf.rstrip().endswith("\\"):
                buf = buf.rstrip()[:-1] + " "
                continue
            try:
                argv = shlex.split(buf, comments=True)
            except ValueError:  # a quote still open: the command goes on on the next line
                continue
            if argv:
                out.append(argv)
            buf = ""
        assert not buf.strip(), f"unterminated command in a shell block: {buf!r}"
    return out


def _all() -> list[tuple[str, list[str]]]:
    return [(page, argv) for page in PAGES for argv in commands((ROOT / page).read_text())]


def _id(item: tuple[str, list[str]]) -> str:
    page, argv = item
    return f"{page}:{' '.join(argv)[:60]}"


def test_the_readme_has_the_quickstart_and_is_short() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    argvs = commands(text)
    assert ["./scripts/demo.sh"] in argvs and ["./scripts/test.sh"] in argvs
    serve = [a for a in argvs if a[:2] == [".venv/bin/eft", "serve"] and "--small-ft" in a]
    assert len(serve) >= 2, "the own-models section serves a full fine-tune and a LoRA adapter"


def test_every_docs_page_is_checked() -> None:
    # Pages in subfolders count too (the glob is recursive).
    assert {"docs/lora.md", "docs/speculative.md", "docs/architectures.md", "docs/results/README.md"} <= set(PAGES)


def test_the_splitter_follows_bash() -> None:
    text = '```bash\na "x\ny" --f 1  # note\nb \\\n  --g\n```\n'
    assert commands(text) == [["a", "x\ny", "--f", "1"], ["b", "--g"]]


@pytest.mark.parametrize("item", _all(), ids=_id)
def test_command_works_as_written(item: tuple[str, list[str]]) -> None:
    page, argv = item
    exe, args = argv[0], argv[1:]
    if exe in EFT:
        if args and args[0] in RUNNABLE:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            run = subprocess.run(
                [sys.executable, "-m", "eft_serve.cli", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                timeout=120,
            )  # fmt: skip
            assert run.returncode == 0, f"{page}: {' '.join(argv)} failed:\n{run.stdout}{run.stderr}"
            assert run.stdout.strip()
        else:
            try:
                build_parser().parse_args(args)
            except SystemExit as e:
                pytest.fail(f"{page}: `{' '.join(argv)}` does not parse (exit {e.code})")
    elif exe.startswith("./scripts/"):
        script = ROOT / exe
        assert script.is_file() and os.access(script, os.X_OK), exe
        if exe == "./scripts/test.sh" and args and not args[0].startswith("-"):
            assert re.search(rf"^{re.escape(args[0])} \|| \| {re.escape(args[0])}\b", script.read_text(), re.M), args
    elif exe in (".venv/bin/python", "python"):
        if args[0] == "-m":
            assert importlib.util.find_spec(args[1]) is not None, args[1]
        else:
            assert (ROOT / args[0]).is_file(), args[0]
    elif exe in ("kubectl", "curl", "pip", "eft-client"):
        for path in (a for a in args if a.startswith(("k8s/", "./clients/"))):
            assert (ROOT / path).exists(), path
    else:
        pytest.fail(f"{page}: `{exe}` is not a command this test knows how to check; teach it")


def test_links_between_the_pages_resolve() -> None:
    for page in PAGES:
        path = ROOT / page
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            resolved = (path.parent / target).resolve()
            assert resolved.exists(), f"{page}: broken link {target}"
