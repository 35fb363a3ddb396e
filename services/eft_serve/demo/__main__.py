"""Build the demo family and report on it: ``python -m eft_serve.demo --out DIR --seed 0``.

Builds the family into DIR (default: its cache dir, see `eft_serve.demo.family`) and prints, per
role, the training time, final loss, held-out fact accuracy and answer-style rates under greedy
decoding, plus the same for the up-scaled combinations ``large_base + (small_ft - small_base)``
(and with ``small_ft_b``) as a check that the family demonstrates EFT up-scaling.

Owns only this command-line check (it sits above `family` and `train`); knows nothing of the service.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from eft_serve.demo.family import BUILD_INFO, DemoFamily, ensure_demo_family
from eft_serve.demo.train import Combo, evaluate


def report(fam: DemoFamily, log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Evaluate every role and the up-scaled combinations on the held-out questions."""
    tok = AutoTokenizer.from_pretrained(str(fam.paths["small_base"]))
    models = {r: AutoModelForCausalLM.from_pretrained(str(p)).eval() for r, p in fam.paths.items()}
    combos: dict[str, Combo] = {r: [(m, 1.0)] for r, m in models.items()}
    combos["upscale_a = large_base + small_ft - small_base"] = [
        (models["large_base"], 1.0),
        (models["small_ft"], 1.0),
        (models["small_base"], -1.0),
    ]
    combos["upscale_b = large_base + small_ft_b - small_base"] = [
        (models["large_base"], 1.0),
        (models["small_ft_b"], 1.0),
        (models["small_base"], -1.0),
    ]
    results: dict[str, dict[str, float]] = {}
    log(f"{'role':48s} {'acc':>6s} {'a':>6s} {'b':>6s} {'plain':>6s}   (held-out, greedy)")
    for name, combo in combos.items():
        r = evaluate(combo, tok, fam.world)
        results[name] = r
        log(f"{name:48s} {r['accuracy']:6.1%} {r['style_a']:6.1%} {r['style_b']:6.1%} {r['style_plain']:6.1%}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m eft_serve.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=None, help="family directory (default: the demo cache dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no per-step training log")
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    fam = ensure_demo_family(
        args.out, seed=args.seed, log=None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    )
    print(f"family at {fam.root} ({time.perf_counter() - t0:.1f}s incl. a possible cached load)")
    stats = json.loads((fam.root / BUILD_INFO).read_text())
    fp = fam.fingerprint()
    for role, info in stats["roles"].items():
        print(
            f"  {role:11s} {info['n_layer']}x{info['n_embd']:<4d} train {info['train_seconds']:6.1f}s  "
            f"steps {info['steps']:4d}  final loss {info['final_loss']:.3f}  "
            f"sha256 {fp['roles'][role]['sha256'][:12]}"
        )
    print(f"  total training wall time {stats['build_seconds']:.1f}s")
    if not args.no_eval:
        report(fam)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
