"""In-process engine step costs for `bench_engine.py`: the rows-vs-gather step cost of one HF
engine, and the large base's decode step alone vs beside the small engines in other processes
(`--step-cost`, `--contention`). No Ray, no Serve: engines in this process or in child processes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

VOCAB = 50257


def step_cost(paths: dict[str, str], batch: int, steps: int, prompt_tokens: int) -> dict[str, float]:
    """In-process, no stack: ms per batched decode step of the large model, row layout vs gather
    layout (same engine, same budget; gather = the padded-past copy the row layout removes)."""
    import numpy as np

    from eft_serve.engine.hf_engine import HFEngine
    from eft_serve.engine.types import SequenceQuery

    out: dict[str, float] = {}
    for layout, attn in (("rows", None), ("gather", "eager")):
        eng = HFEngine.load(paths["large_base"], name=layout, device="cpu", attn_implementation=attn)
        assert eng.kv_layout == layout, eng.kv_layout
        rng = np.random.default_rng(0)
        seqs = [rng.integers(0, VOCAB - 1, size=prompt_tokens).tolist() for _ in range(batch)]
        eng.next_token_logprobs([SequenceQuery(q, sequence_id=f"s{i}") for i, q in enumerate(seqs)], 20)
        t0 = time.perf_counter()
        for _ in range(steps):
            seqs = [q + [int(rng.integers(0, VOCAB - 1))] for q in seqs]
            eng.next_token_logprobs([SequenceQuery(q, sequence_id=f"s{i}") for i, q in enumerate(seqs)], 20)
        out[layout] = 1000 * (time.perf_counter() - t0) / steps
        out[f"{layout}_gathered_tokens_per_step"] = eng.counters.gathered_tokens / steps
    return out


def _step_loop(path: str, steps: int, prompt_tokens: int, ready: Any, go: Any, out: Any) -> None:
    """Child process: one HF engine decoding one sequence for `steps` steps; puts ms per step."""
    import numpy as np

    from eft_serve.engine.hf_engine import HFEngine
    from eft_serve.engine.types import SequenceQuery

    eng = HFEngine.load(path, name=Path(path).name, device="cpu")
    rng = np.random.default_rng(0)
    seq = rng.integers(0, VOCAB - 1, size=prompt_tokens).tolist()
    eng.next_token_logprobs([SequenceQuery(seq, sequence_id="s")], 20)
    ready.put(1)
    go.wait()
    t0 = time.perf_counter()
    for _ in range(steps):
        seq.append(int(rng.integers(0, VOCAB - 1)))
        eng.next_token_logprobs([SequenceQuery(seq, sequence_id="s")], 20)
    out.put((Path(path).name, 1000 * (time.perf_counter() - t0) / steps))


def contention(paths: dict[str, str], steps: int, prompt_tokens: int) -> list[dict[str, float]]:
    """The large base's decode step (one thread, batch 1) alone, then while the small engines
    decode in other processes at the same time: what sharing this machine costs the large pool."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    rows = []
    for others in ([], ["small_base"], ["small_base", "small_ft"]):
        ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        roles = ["large_base", *others]
        # The small engines run 4x the steps, so they keep running while the large one is timed.
        procs = [
            ctx.Process(
                target=_step_loop,
                args=(paths[r], steps * (1 if r == "large_base" else 4), prompt_tokens, ready, go, out),
            )
            for r in roles
        ]
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.get(timeout=300)
        go.set()
        for proc in procs:
            proc.join()
        rows.append(dict(out.get() for _ in procs))
    return rows
