"""Regenerate the Python protobuf/gRPC stubs from protos/ (the one command: `python scripts/gen_protos.py`).

Output goes to services/eft_serve/proto_gen/, with imports rewritten to be package-relative so
the stubs import as `eft_serve.proto_gen.eft.v1...`. `--check` exits non-zero if the committed
stubs differ from a fresh generation (used by a test so they cannot drift).
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
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
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


def same_tree(a: Path, b: Path) -> list[str]:
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    diffs = sorted(str(p) for p in files_a ^ files_b)
    diffs += sorted(str(p) for p in files_a & files_b if not filecmp.cmp(a / p, b / p, shallow=False))
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs drift")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            diffs = same_tree(Path(tmp), OUT)
        if diffs:
            print("generated stubs drift from protos/: " + ", ".join(diffs), file=sys.stderr)
            print("run: python scripts/gen_protos.py", file=sys.stderr)
            return 1
        print("stubs up to date")
        return 0
    if OUT.exists():
        shutil.rmtree(OUT)
    generate(OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
