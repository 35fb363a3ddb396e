"""Regenerate the Python protobuf/gRPC stubs from protos/ (the one command: `python scripts/gen_protos.py`).

Output goes to services/eft_serve/proto_gen/, with imports rewritten to be package-relative so
the stubs import as `eft_serve.proto_gen.eft.v1...`. `--check` follows the convention of every
generated artifact: generate in a temporary directory, compare with the committed stubs, exit 1
naming each drifted file and the command that regenerates it, exit 0 when in sync
(tests/unit/test_generated_in_sync.py runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "services" / "eft_serve" / "proto_gen"


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for py in out.rglob("*.py*"):
        # protoc emits absolute imports (`from eft.v1 import x_pb2`); make them package-relative.
        text = py.read_text()
        text = re.sub(r"^from eft\.v1 import", "from eft_serve.proto_gen.eft.v1 import", text, flags=re.M)
        # The module name given to the message builder becomes each class's __module__, which
        # pickling (Ray Serve passes requests between processes) must be able to import.
        text = re.sub(r"'eft\.v1\.(\w+_pb2)'", r"'eft_serve.proto_gen.eft.v1.\1'", text)
        py.write_text(text)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def drift(fresh: Path, committed: Path) -> list[str]:
    """`path: why` for each file of `committed` that differs from the `fresh` tree (empty = in sync)."""
    new, old = _files(fresh), _files(committed)
    problems = [f"{committed / p}: missing" for p in sorted(new - old)]
    problems += [f"{committed / p}: not generated from protos/ (stale)" for p in sorted(old - new)]
    problems += [
        f"{committed / p}: differs from a fresh generation"
        for p in sorted(new & old)
        if not filecmp.cmp(fresh / p, committed / p, shallow=False)
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 naming each stub that differs from a fresh generation",
    )
    parser.add_argument("--out", type=Path, help=f"stubs directory (default: {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    out: Path = args.out or OUT
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            problems = drift(Path(tmp), out)
        if problems:
            regenerate = "python scripts/gen_protos.py" + (f" --out {args.out}" if args.out else "")
            print("\n".join(problems), file=sys.stderr)
            print(f"regenerate with: {regenerate}", file=sys.stderr)
            return 1
        print("stubs up to date")
        return 0
    if out.exists():
        shutil.rmtree(out)
    generate(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
