"""Which small model should draft for speculative up-scaling? Acceptance of two drafters, one run.

Drafters (greedy), measured against the up-scaled target (large_base + β·(small_ft − small_base),
exact full-vocabulary merge, greedy) on the demo family's held-out prompts:
  small_ft        the small fine-tuned model alone (what the service drafts with today)
  small EFT pair  small_base + β·(small_ft − small_base) (the small models' own up-scaling)
At β = 1 the two are the same distribution by construction; they differ for β ≠ 1.

For each prompt the target's greedy continuation is decoded once; every model then scores the
whole continuation in one pass (teacher forcing), which gives each drafter's greedy choice at
every position. Printed per β: per-token agreement with the target (the chance a drafted token is
kept once the ones before it were) and the mean number of tokens kept per block of 8 drafted from
each position. Pool calls per drafted token differ: small_ft drafts k tokens in one call, the pair
needs the two small pools at every drafted token.

    .venv/bin/python tests/bench/bench_drafters.py [--tokens 48] [--prompts 8]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--block", type=int, default=8)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from eft_serve.demo.family import ensure_demo_family
    from eft_serve.engine.hf_engine import HFEngine
    from eft_serve.engine.types import SequenceQuery

    torch.set_num_threads(1)
    family = ensure_demo_family()
    tok = AutoTokenizer.from_pretrained(family.paths["large_base"])
    roles = ("large_base", "small_base", "small_ft")
    engines = {r: HFEngine.load(family.paths[r], name=r, device="cpu") for r in roles}
    prompts = [tok.encode(q.prompt) for q in family.world.held_out_questions()[: args.prompts]]

    def full_logprobs(role: str, ids: list[int], n: int) -> np.ndarray:
        (res,) = engines[role].next_token_logprobs([SequenceQuery(ids, num_positions=n)], 0)
        return np.stack([np.asarray(p.full_logprobs, dtype=np.float64) for p in res.positions])

    print(f"\nDrafters for speculative up-scaling, demo family, {len(prompts)} prompts x {args.tokens} tokens")
    print(f"{'beta':>5s} {'drafter':>15s} {'per-token agreement':>20s} {'kept per block of ' + str(args.block):>22s}")
    for beta in (0.5, 1.0, 1.5, 2.0):
        agree: dict[str, list[bool]] = {"small_ft": [], "small EFT pair": []}
        kept: dict[str, list[int]] = {"small_ft": [], "small EFT pair": []}
        for prompt in prompts:
            # The target's greedy continuation, token by token (exact merge).
            ids = list(prompt)
            for _ in range(args.tokens):
                lp = {r: full_logprobs(r, ids, 1)[0] for r in roles}
                score = lp["large_base"] + beta * (lp["small_ft"] - lp["small_base"])
                ids.append(int(np.argmax(score)))
            n = args.tokens
            lp = {r: full_logprobs(r, ids[:-1], n) for r in roles}  # position j predicts ids[len(prompt)+j]
            target = np.asarray(ids[len(prompt) :])
            choices = {
                "small_ft": np.argmax(lp["small_ft"], axis=1),
                "small EFT pair": np.argmax(lp["small_base"] + beta * (lp["small_ft"] - lp["small_base"]), axis=1),
            }
            for name, choice in choices.items():
                hit = choice == target
                agree[name] += hit.tolist()
                for start in range(n):
                    run = 0
                    while run < args.block and start + run < n and hit[start + run]:
                        run += 1
                    kept[name].append(run)
        for name in agree:
            print(f"{beta:5.1f} {name:>15s} {np.mean(agree[name]):20.3f} {np.mean(kept[name]):22.2f}")


if __name__ == "__main__":
    main()
