"""Baseline speed of EFT decoding, measured side by side in one run on the demo family.

Rows (greedy, 64 new tokens, ignore EOS, held-out prompts):
  reference       the independent in-process reference (plain transformers, KV cache, 3 models)
  in-process      engine + coordinator in this process (no Ray, gRPC or Redis)
  service x1      one stream through the full stack (Serve gRPC proxy -> coordinator -> 3 pools)
  service x8      8 concurrent streams through the stack (aggregate tokens/s)
  large_base x1   the large base alone through the stack (recipe large_base)
Each row prints tokens/s and inter-token latency p50/p99, and its ratio to the reference.
The result cache is disabled so every token really reaches the pools.

    .venv/bin/python tests/bench/bench_baseline.py [--tokens 64] [--prompts 4]

Writes bench-out/baseline.json. Starts and stops its own Ray cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np

from eft_serve.infra.ports import free_port


def summarize(name: str, tokens: int, wall: float, itls: list[float]) -> dict:
    itl = np.asarray(itls) * 1000 if itls else np.asarray([0.0])
    return {
        "name": name,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "itl_p50_ms": float(np.percentile(itl, 50)),
        "itl_p99_ms": float(np.percentile(itl, 99)),
    }


def stream_once(address: str, prompt: str, n: int, recipe: str | None) -> tuple[int, list[float]]:
    from eft_serve.client import EftClient

    with EftClient(address, timeout=600) as client:
        stamps: list[float] = []
        count = 0
        for msg in client.generate(prompt, recipe=recipe, temperature=0, max_new_tokens=n, ignore_eos=True):
            if msg.tokens:
                stamps.append(time.perf_counter())
                count += len(msg.tokens)
    return count, list(np.diff(stamps))


def run_streams(
    address: str, prompts: list[str], n: int, concurrency: int, recipe: str | None = None
) -> tuple[int, float, list[float]]:
    results: list[tuple[int, list[float]]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        r = stream_once(address, prompts[i % len(prompts)], n, recipe)
        with lock:
            results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(r[0] for r in results), wall, [x for r in results for x in r[1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from eft_serve.config import EftConfig, demo_config
    from eft_serve.coordinator.request import GenerationRequest
    from eft_serve.coordinator.service import EftCoordinator
    from eft_serve.core.recipe import resolve_recipe
    from eft_serve.demo.family import ensure_demo_family
    from eft_serve.engine.hf_engine import HFEngine
    from eft_serve.reference import ReferenceEFT
    from eft_serve.stack import local_stack
    from eft_serve.transport.inprocess import InProcessPool

    torch.set_num_threads(1)
    family = ensure_demo_family()
    prompts = [q.prompt for q in family.world.held_out_questions()[: args.prompts]]
    tok = AutoTokenizer.from_pretrained(family.paths["large_base"])
    cfg = demo_config()
    rows = []

    # 1. Independent reference.
    ref = ReferenceEFT(family.paths, resolve_recipe(cfg.recipes, "upscale").coefficients(), use_kv_cache=True)
    ref.greedy(tok.encode(prompts[0]), 4)  # warm-up
    t0, itls, count = time.perf_counter(), [], 0
    for p in prompts:
        out, times = ref.greedy(tok.encode(p), args.tokens)
        count += len(out)
        itls += times[1:]
    rows.append(summarize("reference (in-process)", count, time.perf_counter() - t0, itls))

    # 2. Engine + coordinator in-process (default top-k merge).
    engines = {
        r: HFEngine.load(family.paths[r], name=r, device="cpu") for r in ("large_base", "small_base", "small_ft")
    }
    coord = EftCoordinator({r: InProcessPool(e, r) for r, e in engines.items()}, cfg.recipes, tok, cfg.coordinator)

    async def inproc() -> tuple[int, float, list[float]]:
        await coord.start()
        t0, itls, count = time.perf_counter(), [], 0
        for p in prompts:
            stamps = []
            stream = await coord.generate(
                GenerationRequest(prompt=p, temperature=0, max_new_tokens=args.tokens, ignore_eos=True)
            )
            async for c in stream:
                if c.tokens:
                    stamps.append(time.perf_counter())
                    count += len(c.tokens)
            itls += list(np.diff(stamps))
        return count, time.perf_counter() - t0, itls

    count, wall, itls = asyncio.run(inproc())
    rows.append(summarize("engine+coordinator in-process", count, wall, itls))

    # 3-5. Through the service.
    data = cfg.model_dump()
    data["grpc"]["port"] = free_port()
    data["cache"]["enabled"] = False
    data["ray"]["num_cpus"] = 8
    svc = EftConfig.model_validate(data)
    with local_stack(svc, http_port=free_port(), log=lambda m: print(f"[bench] {m}")):
        address = f"127.0.0.1:{svc.grpc.port}"
        stream_once(address, prompts[0], 4, None)  # warm-up
        stream_once(address, prompts[0], 4, "large_base")
        count, wall, itls = 0, 0.0, []
        for p in prompts:
            c, w, i = run_streams(address, [p], args.tokens, 1)
            count, wall, itls = count + c, wall + w, itls + i
        rows.append(summarize("service, 1 stream", count, wall, itls))
        count, wall, itls = run_streams(address, prompts, args.tokens, args.concurrency)
        rows.append(summarize(f"service, {args.concurrency} concurrent streams", count, wall, itls))
        count, wall, itls = 0, 0.0, []
        for p in prompts:
            c, w, i = run_streams(address, [p], args.tokens, 1, recipe="large_base")
            count, wall, itls = count + c, wall + w, itls + i
        rows.append(summarize("service, large_base alone, 1 stream", count, wall, itls))

    base = rows[0]["tokens_per_s"]
    print(f"\nBaseline, demo family, greedy, {args.tokens} new tokens x {len(prompts)} prompts, same machine, one run")
    print(f"{'row':42s} {'tok/s':>8s} {'ITL p50 ms':>11s} {'ITL p99 ms':>11s} {'tok/s vs reference':>19s}")
    for r in rows:
        r["ratio_vs_reference"] = r["tokens_per_s"] / base
        print(
            f"{r['name']:42s} {r['tokens_per_s']:8.1f} {r['itl_p50_ms']:11.2f} {r['itl_p99_ms']:11.2f} {r['ratio_vs_reference']:19.2f}"
        )
    eft1 = next(r for r in rows if r["name"] == "service, 1 stream")
    lb = next(r for r in rows if "large_base alone" in r["name"])
    print(
        f"\nEFT (3 models) / large base alone through the service, tok/s: {eft1['tokens_per_s'] / lb['tokens_per_s']:.2f}"
    )
    Path("bench-out").mkdir(exist_ok=True)
    Path("bench-out/baseline.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
