"""A LoRA expert served in a pool of its own vs co-located in its base's pool, side by side in one run.

In-process (demo family; the expert is a random-weight LoRA adapter over the demo small base,
`testing.lora_fixtures`; result cache off). Two stacks over the same engines' weights:
  separate    large_base | small_base | small_ft = small base + adapter, merged (3 pools, 3 calls a token)
  colocated   large_base | small_base with the adapter inside (2 pools, 2 calls a token: the small
              base's and the adapter's rows share one call and one forward)
Plain up-scaling (no speculation), greedy, ignore EOS, held-out prompts; S concurrent streams per
round, rounds alternate the two stacks. Prints per stack tok/s (all streams), ITL p50/p90 and pool
calls per token, and the co-located / separate ratios. First it prints how far the two stacks' greedy
outputs agree on the first prompt (the tests check them equal to the merged reference).

    .venv/bin/python tests/bench/bench_lora.py [--tokens 32] [--streams 1 4] [--rounds 3] [--top-k 20]

Writes bench-out/lora.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def percentile_ms(values: list[float], q: float) -> float:
    s = sorted(values)
    return 1000.0 * s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] if s else float("nan")


def build_stacks(tmp: Path) -> tuple[dict[str, Any], Any, Any]:
    from transformers import AutoTokenizer

    from eft_serve.config import CoordinatorConfig, demo_config
    from eft_serve.coordinator.pool_client import ColocatedRole
    from eft_serve.coordinator.service import EftCoordinator
    from eft_serve.demo.family import ensure_demo_family
    from eft_serve.engine.hf_engine import HFEngine
    from eft_serve.testing.lora_fixtures import make_lora_adapter
    from eft_serve.transport.inprocess import InProcessPool

    family = ensure_demo_family()
    base = family.paths["small_base"]
    adapter = make_lora_adapter(base, tmp / "adapter", seed=3, std=0.2)
    tok = AutoTokenizer.from_pretrained(base)

    def load(path: Path, name: str, **kw: Any) -> HFEngine:
        return HFEngine.load(path, name=name, device="cpu", **kw)

    cfg = CoordinatorConfig(max_new_tokens_cap=512, coalesce_pool_calls=True)
    separate = {
        "large_base": InProcessPool(load(family.paths["large_base"], "large_base"), "large_base"),
        "small_base": InProcessPool(load(base, "small_base"), "small_base"),
        "small_ft": InProcessPool(load(base, "small_ft", merge_adapter=adapter), "small_ft"),
    }
    host = InProcessPool(load(base, "small_base", adapters={"small_ft": adapter}), "small_base")
    colocated = {
        "large_base": InProcessPool(load(family.paths["large_base"], "large_base"), "large_base"),
        "small_base": host,
        "small_ft": ColocatedRole("small_ft", host),
    }
    recipes = demo_config().recipes
    stacks = {
        name: EftCoordinator(p, recipes, tok, cfg) for name, p in (("separate", separate), ("colocated", colocated))
    }
    return stacks, family, tok


async def one_stream(coord: Any, prompt: str, n: int, top_k: int) -> tuple[list[int], list[float], int]:
    from eft_serve.coordinator.request import GenerationRequest, MergeOptions

    stream = await coord.generate(
        GenerationRequest(
            prompt=prompt,
            merge=MergeOptions(logprob_top_k=top_k),
            temperature=0,
            max_new_tokens=n,
            ignore_eos=True,
        )
    )
    ids: list[int] = []
    gaps: list[float] = []
    last = None
    calls = 0
    async for chunk in stream:
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
        ids += [t.token_id for t in chunk.tokens]
        if chunk.usage is not None:
            calls = chunk.usage.fetch.pool_calls
    return ids, gaps, calls


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        stacks, family, _ = build_stacks(Path(d))
        for coord in stacks.values():
            await coord.start()
        prompts = [q.prompt for q in family.world.held_out_questions()[: max(args.streams)]]
        # Same tokens from both (the exact merge differs only by float rounding of merged vs LoRA weights).
        outs = {name: (await one_stream(c, prompts[0], args.tokens, args.top_k))[0] for name, c in stacks.items()}
        agree = sum(a == b for a, b in zip(outs["separate"], outs["colocated"])) / args.tokens
        results: dict[str, Any] = {"tokens": args.tokens, "top_k": args.top_k, "agreement": agree, "rows": []}
        for streams in args.streams:
            cells: dict[str, dict[str, list[float]]] = {n: {"tps": [], "gaps": [], "calls": []} for n in stacks}
            for _ in range(args.rounds):
                for name, coord in stacks.items():
                    started = time.perf_counter()
                    done = await asyncio.gather(
                        *(one_stream(coord, prompts[i % len(prompts)], args.tokens, args.top_k) for i in range(streams))
                    )
                    wall = time.perf_counter() - started
                    cells[name]["tps"].append(sum(len(ids) for ids, _, _ in done) / wall)
                    for ids, gaps, calls in done:
                        cells[name]["gaps"] += gaps
                        cells[name]["calls"].append(calls / len(ids))
            for name, c in cells.items():
                results["rows"].append(
                    {
                        "stack": name,
                        "streams": streams,
                        "tokens_per_s": statistics.median(c["tps"]),
                        "itl_p50_ms": percentile_ms(c["gaps"], 0.5),
                        "itl_p90_ms": percentile_ms(c["gaps"], 0.9),
                        "pool_calls_per_token": statistics.mean(c["calls"]),
                    }
                )
        for coord in stacks.values():
            await coord.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=20)
    args = ap.parse_args()
    res = asyncio.run(run(args))
    print(f"greedy agreement separate vs colocated (first prompt): {res['agreement']:.2f}")
    print(f"{'streams':>7} {'stack':>10} {'tok/s':>8} {'ITL p50':>8} {'ITL p90':>8} {'calls/tok':>9}")
    rows = {(r["streams"], r["stack"]): r for r in res["rows"]}
    for streams in args.streams:
        for stack in ("separate", "colocated"):
            r = rows[(streams, stack)]
            print(
                f"{streams:>7} {stack:>10} {r['tokens_per_s']:>8.1f} {r['itl_p50_ms']:>7.1f}ms "
                f"{r['itl_p90_ms']:>7.1f}ms {r['pool_calls_per_token']:>9.2f}"
            )
        s, c = rows[(streams, "separate")], rows[(streams, "colocated")]
        print(
            f"{streams:>7} {'ratio c/s':>10} {c['tokens_per_s'] / s['tokens_per_s']:>7.2f}x "
            f"{c['itl_p50_ms'] / s['itl_p50_ms']:>7.2f}x {c['itl_p90_ms'] / s['itl_p90_ms']:>7.2f}x"
        )
    out = Path("bench-out")
    out.mkdir(exist_ok=True)
    (out / "lora.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
