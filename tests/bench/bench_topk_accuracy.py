"""How close is top-k merging to exact full-vocabulary merging on the demo family?

Teacher-forced along the exact greedy trajectory of held-out prompts, for each per-model top-k
(and conservative decoding on/off) it measures: greedy token agreement with exact, and the mean
total-variation distance between the top-k merged distribution and the exact one.

    .venv/bin/python tests/bench/bench_topk_accuracy.py [--prompts 12] [--tokens 24]

A thin wrapper: the measurement lives in `eft_serve.evaluation.topk_accuracy` (also used by
`eft eval --topk-table`, which adds the scores through the service). Runs in-process (engine +
merge core, no Ray/gRPC/Redis). Prints a table; writes bench-out/topk_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eft_serve.demo.family import ensure_demo_family
from eft_serve.evaluation.topk_accuracy import measure_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--ks", default="5,20,100")
    ap.add_argument("--conservative-top-p", type=float, default=0.9)
    args = ap.parse_args()
    family = ensure_demo_family()
    prompts = [q.prompt for q in family.world.held_out_questions()[: args.prompts]]
    rows = measure_demo(
        family,
        prompts,
        ks=[int(k) for k in args.ks.split(",")],
        max_tokens=args.tokens,
        conservative_top_p=args.conservative_top_p,
    )
    print(
        f"\nTop-k merge vs exact full-vocabulary merge (up-scaling, β=1), demo family, "
        f"{args.prompts} held-out prompts, teacher-forced on the exact greedy path"
    )
    print(
        f"{'per-model top-k':>16s} {'conservative':>13s} {'greedy agreement':>17s} {'mean TV':>9s} {'positions':>10s}"
    )
    for r in rows:
        label = "exact" if r.top_k == 0 else str(r.top_k)
        print(
            f"{label:>16s} {'on' if r.conservative else 'off':>13s} {r.agreement:17.3f} {r.mean_tv:9.4f} {r.positions:10d}"
        )
    Path("bench-out").mkdir(exist_ok=True)
    Path("bench-out/topk_accuracy.json").write_text(json.dumps([r.as_dict() for r in rows], indent=2))


if __name__ == "__main__":
    main()
