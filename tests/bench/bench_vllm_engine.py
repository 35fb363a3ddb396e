"""vLLM engine vs the transformers engine on the demo family's large_base: per-call latency ratios.

Rows (each the median of --reps calls, after one warm-up):
  step x1        one sequence, next token (top-20), the prefix grown by one token per call (decode)
  step x16       16 sequences in one call (the batch a pool replica sees under concurrency)
  block m=5      one sequence, 5 trailing positions (a speculative block), full vocabulary
  exact x1       one sequence, next token, full vocabulary (logprob_top_k = 0)
  draft k=8      one greedy draft of 8 tokens
Prints milliseconds per call for both engines and vLLM / HF; plus vLLM's start-up time.

    .venv/bin/python tests/bench/bench_vllm_engine.py [--reps 20]

Numbers from a shared 2-core CPU box with a ~1M-parameter model measure per-call overhead, not
model throughput: vLLM's advantages (paged KV, continuous batching on a GPU) need a real model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    from eft_serve.demo.family import ensure_demo_family
    from eft_serve.engine.hf_engine import HFEngine
    from eft_serve.engine.types import DraftQuery, SequenceQuery
    from eft_serve.engine.vllm_config import VLLMConfig
    from eft_serve.engine.vllm_engine import VLLMEngine

    path = ensure_demo_family().paths["large_base"]
    t0 = time.perf_counter()
    vllm = VLLMEngine.load(path, name="large_base", options=VLLMConfig(cpu_kv_space_gib=1, max_num_seqs=32))
    load_s = time.perf_counter() - t0
    hf = HFEngine.load(path, name="large_base", device="cpu")
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(1, 700, 40)]
    many = [[int(x) for x in rng.integers(1, 700, 40)] for _ in range(16)]
    rows: dict[str, dict[str, float]] = {}
    try:
        for label, engine in (("hf", hf), ("vllm", vllm)):
            seq = list(base)

            def step(engine=engine, seq=seq) -> None:
                r = engine.next_token_logprobs([SequenceQuery(seq)], 20)[0]
                seq.append(int(r.positions[0].top_ids[0]))
                if len(seq) > 200:
                    del seq[40:]

            cases = {
                "step x1": step,
                "step x16": lambda e=engine: e.next_token_logprobs([SequenceQuery(s) for s in many], 20),
                "block m=5": lambda e=engine: e.next_token_logprobs([SequenceQuery(base, num_positions=5)], 0),
                "exact x1": lambda e=engine: e.next_token_logprobs([SequenceQuery(base)], 0),
                "draft k=8": lambda e=engine: e.draft([DraftQuery(base, 8)]),
            }
            for name, fn in cases.items():
                rows.setdefault(name, {})[label] = _median_ms(fn, args.reps)
    finally:
        vllm.close()
    print(f"vLLM start-up: {load_s:.1f} s")
    print(f"{'case':<12} {'hf ms':>8} {'vllm ms':>8} {'vllm/hf':>8}")
    for name, r in rows.items():
        print(f"{name:<12} {r['hf']:8.2f} {r['vllm']:8.2f} {r['vllm'] / r['hf']:8.2f}")
    out = Path("bench-out")
    out.mkdir(exist_ok=True)
    (out / "vllm_engine.json").write_text(json.dumps({"load_s": load_s, "rows": rows}, indent=2))


if __name__ == "__main__":  # vLLM starts its engine process with spawn: keep the guard
    main()
