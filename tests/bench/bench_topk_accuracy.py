"""How close is top-k merging to exact full-vocabulary merging on the demo family?

Teacher-forced along the exact greedy trajectory of held-out prompts, for each per-model top-k
(and conservative decoding on/off) it measures: greedy token agreement with exact, and the mean
total-variation distance between the top-k merged distribution and the exact one.

    .venv/bin/python tests/bench/bench_topk_accuracy.py [--prompts 12] [--tokens 24]

Runs in-process (engine + merge core, no Ray/gRPC/Redis). Prints a table; writes
bench-out/topk_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from eft_serve.config import demo_config
from eft_serve.core.merge import merge_position
from eft_serve.core.recipe import resolve_recipe
from eft_serve.demo.family import ensure_demo_family
from eft_serve.engine.hf_engine import HFEngine
from eft_serve.engine.types import SequenceQuery

ROLES = ("large_base", "small_base", "small_ft")


def total_variation(exact_support: np.ndarray, exact_lp: np.ndarray, support: np.ndarray, lp: np.ndarray) -> float:
    p = np.exp(exact_lp)
    q = np.zeros_like(p)
    q[support] = np.exp(lp)  # exact support is the whole vocabulary, ids == indices
    return 0.5 * float(np.abs(p - q).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--ks", default="5,20,100")
    ap.add_argument("--conservative-top-p", type=float, default=0.9)
    args = ap.parse_args()
    family = ensure_demo_family()
    engines = {r: HFEngine.load(family.paths[r], name=r, device="cpu") for r in ROLES}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family.paths["large_base"])
    vocab = engines["large_base"].info.vocab_size
    recipe = resolve_recipe(demo_config().recipes, "upscale")
    ks = [int(k) for k in args.ks.split(",")]
    rows: dict[tuple[int, bool], dict[str, list[float]]] = {(k, c): {"agree": [], "tv": []} for k in ks for c in (False, True)}
    for c in (False, True):
        rows[(0, c)] = {"agree": [], "tv": []}
    for q in family.world.held_out_questions()[: args.prompts]:
        ids = tok.encode(q.prompt)
        for _ in range(args.tokens):
            query = [SequenceQuery(token_ids=list(ids))]
            full = {r: engines[r].next_token_logprobs(query, 0)[0].positions[0] for r in ROLES}
            exact = merge_position(recipe, full, vocab)
            for conservative in (False, True):
                ctp = args.conservative_top_p if conservative else None
                exact_c = merge_position(recipe, full, vocab, conservative_top_p=ctp)
                rows[(0, conservative)]["agree"].append(float(np.argmax(exact_c.logprobs) == np.argmax(exact.logprobs)))
                rows[(0, conservative)]["tv"].append(total_variation(exact.support, exact.logprobs, exact_c.support, exact_c.logprobs))
                for k in ks:
                    part = {r: engines[r].next_token_logprobs(query, k)[0].positions[0] for r in ROLES}
                    approx = merge_position(recipe, part, vocab, conservative_top_p=ctp)
                    same = approx.support[int(np.argmax(approx.logprobs))] == exact.support[int(np.argmax(exact.logprobs))]
                    rows[(k, conservative)]["agree"].append(float(same))
                    rows[(k, conservative)]["tv"].append(total_variation(exact.support, exact.logprobs, approx.support, approx.logprobs))
            nxt = int(exact.support[int(np.argmax(exact.logprobs))])
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
    print(f"\nTop-k merge vs exact full-vocabulary merge (up-scaling, β=1), demo family, "
          f"{args.prompts} held-out prompts, teacher-forced on the exact greedy path, vocab {vocab}")
    print(f"{'per-model top-k':>16s} {'conservative':>13s} {'greedy agreement':>17s} {'mean TV':>9s} {'positions':>10s}")
    out = []
    for (k, c), v in sorted(rows.items(), key=lambda kv: (kv[0][0] == 0, kv[0][0], kv[0][1])):
        agree, tv = float(np.mean(v["agree"])), float(np.mean(v["tv"]))
        label = "exact" if k == 0 else str(k)
        print(f"{label:>16s} {'on' if c else 'off':>13s} {agree:17.3f} {tv:9.4f} {len(v['tv']):10d}")
        out.append({"top_k": k, "conservative": c, "agreement": agree, "mean_tv": tv, "positions": len(v["tv"])})
    Path("bench-out").mkdir(exist_ok=True)
    Path("bench-out/topk_accuracy.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
