"""Speculative up-scaling vs plain up-scaling vs the large base alone, side by side in one run.

In-process (demo family, result cache off), per workload, interleaved prompt by prompt:
  plain EFT, speculative EFT (adaptive, max 8 — the default policy), speculative EFT (fixed
  block 4, adaptive off: no fall-back, for reference)
Workloads:
  natural     held-out questions, greedy, answers end at EOS (up to 64 tokens)
  past-answer held-out questions, greedy, ignore EOS, 40 tokens (continuations past the answer)
  sampled     held-out questions, temperature 1, seeded, ignore EOS, 40 tokens
  beta-3      held-out questions, greedy, β = 3, ignore EOS, 40 tokens: the up-scaled model moves far
              from the drafter (small_ft), about 1 drafted token in 8 is kept (low agreement)
Service (one stream each): the large base alone, plain EFT, speculative EFT (adaptive, max 8), greedy,
ignore EOS. Each row prints tok/s and its ratio to plain EFT in the same setting, the median
time to first token and its ratio, and for speculative rows the acceptance (kept/drafted, per
block) and fall-backs to plain decoding. Speculative output is checked to be token-for-token the
plain output (the coupled acceptance rule) before any figure is printed.

    .venv/bin/python tests/bench/bench_speculative.py [--tokens 40] [--prompts 6] [--no-service]

Writes bench-out/speculative.json. The service part starts and stops its own Ray cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any


def _row(name: str, tokens: int, wall: float, ids: list[list[int]], usage: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ids": ids, **usage}


def workloads(prompts: list[str], n: int) -> dict[str, list[dict[str, Any]]]:
    from eft_serve.coordinator.request import MergeOptions

    return {
        "natural": [dict(prompt=p, temperature=0, max_new_tokens=64) for p in prompts],
        "past-answer": [dict(prompt=p, temperature=0, max_new_tokens=n, ignore_eos=True) for p in prompts],
        "sampled": [
            dict(prompt=p, temperature=1.0, seed=i, max_new_tokens=n, ignore_eos=True) for i, p in enumerate(prompts)
        ],
        "beta-3": [
            dict(prompt=p, temperature=0, max_new_tokens=n, ignore_eos=True, merge=MergeOptions(beta=3.0))
            for p in prompts
        ],
    }


def in_process_rows(family: Any, prompts: list[str], n: int) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from eft_serve.config import demo_config
    from eft_serve.coordinator.request import GenerationRequest, SpeculativeOptions
    from eft_serve.coordinator.service import EftCoordinator
    from eft_serve.engine.hf_engine import HFEngine
    from eft_serve.transport.inprocess import InProcessPool

    cfg = demo_config()
    tok = AutoTokenizer.from_pretrained(family.paths["large_base"])
    engines = {
        r: HFEngine.load(family.paths[r], name=r, device="cpu") for r in ("large_base", "small_base", "small_ft")
    }
    coord = EftCoordinator({r: InProcessPool(e, r) for r, e in engines.items()}, cfg.recipes, tok, cfg.coordinator)
    variants = {
        "plain EFT": SpeculativeOptions(enabled=False),
        "speculative EFT (adaptive, max 8)": SpeculativeOptions(enabled=True, max_draft_tokens=8),
        "speculative EFT (fixed block 4)": SpeculativeOptions(enabled=True, max_draft_tokens=4, adaptive=False),
    }

    async def one(req: Any) -> tuple[list[int], Any, float]:
        t0 = time.perf_counter()
        stream = await coord.generate(req)
        seq: list[int] = []
        usage = None
        async for c in stream:
            seq += [t.token_id for t in c.tokens]
            usage = c.usage or usage
        return seq, usage, time.perf_counter() - t0

    async def run() -> list[dict[str, Any]]:
        await coord.start()
        rows = []
        for wname, reqs in workloads(prompts, n).items():
            for kw in reqs:  # warm-up (untimed): every variant sees the same warm engines
                await one(GenerationRequest(**kw))
            acc: dict[str, dict[str, Any]] = {
                v: {"wall": 0.0, "ids": [], "ttft": [], "drafted": 0, "accepted": 0, "blocks": 0, "fallbacks": 0}
                for v in variants
            }
            # Interleaved prompt by prompt, so drift on the shared machine hits every variant alike.
            for kw in reqs:
                for vname, spec in variants.items():
                    seq, usage, wall = await one(GenerationRequest(**kw, speculative=spec))
                    a, s = acc[vname], usage.speculation
                    a["wall"] += wall
                    a["ids"].append(seq)
                    a["ttft"].append(usage.time_to_first_token_ms)
                    a["drafted"] += s.drafted_tokens
                    a["accepted"] += s.accepted_tokens
                    a["blocks"] += s.speculative_blocks
                    a["fallbacks"] += s.fallbacks
            for vname, a in acc.items():
                usage_row = {k: a[k] for k in ("drafted", "accepted", "blocks", "fallbacks")}
                usage_row["ttft_ms"] = statistics.median(a["ttft"])
                tokens = sum(len(x) for x in a["ids"])
                rows.append(_row(f"in-process {wname}, {vname}", tokens, a["wall"], a["ids"], usage_row))
        return rows

    return asyncio.run(run())


def service_rows(prompts: list[str], n: int) -> list[dict[str, Any]]:
    from eft_serve.client import EftClient
    from eft_serve.config import EftConfig, demo_config
    from eft_serve.infra.ports import free_port
    from eft_serve.stack import local_stack

    data = demo_config().model_dump()
    data["grpc"]["port"] = free_port()
    data["cache"]["enabled"] = False
    data["ray"]["num_cpus"] = 8
    svc = EftConfig.model_validate(data)
    variants: dict[str, dict[str, Any]] = {
        "service, large_base alone": dict(recipe="large_base", speculative=False),
        "service, plain EFT": dict(speculative=False),
        "service, speculative EFT (adaptive, max 8)": dict(speculative=True, max_draft_tokens=8),
    }
    acc: dict[str, dict[str, Any]] = {
        v: {"wall": 0.0, "ids": [], "ttft": [], "drafted": 0, "accepted": 0, "blocks": 0} for v in variants
    }
    with local_stack(svc, http_port=free_port(), log=lambda m: print(f"[bench] {m}")):
        with EftClient(f"127.0.0.1:{svc.grpc.port}", timeout=600) as client:
            for kw in variants.values():  # warm-up every path once
                client.complete(prompts[0], temperature=0, max_new_tokens=4, **kw)
            for p in prompts:  # interleaved prompt by prompt
                for name, kw in variants.items():
                    t0 = time.perf_counter()
                    r = client.complete(p, temperature=0, max_new_tokens=n, ignore_eos=True, **kw)
                    a = acc[name]
                    a["wall"] += time.perf_counter() - t0
                    a["ids"].append(list(r.token_ids))
                    a["ttft"].append(r.usage.time_to_first_token_ms)
                    a["drafted"] += r.usage.drafted_tokens
                    a["accepted"] += r.usage.accepted_tokens
                    a["blocks"] += r.usage.speculative_blocks
    rows = []
    for name, a in acc.items():
        usage = {k: a[k] for k in ("drafted", "accepted", "blocks")}
        usage["ttft_ms"] = statistics.median(a["ttft"])
        rows.append(_row(name, sum(len(x) for x in a["ids"]), a["wall"], a["ids"], usage))
    return rows


def report(rows: list[dict[str, Any]], plain_name: str) -> None:
    plain = next(r for r in rows if r["name"] == plain_name)
    for r in rows:
        if "speculative" in r["name"]:
            assert r["ids"] == plain["ids"], f"{r['name']}: output differs from plain decoding"
        r["ratio_vs_plain_eft"] = r["tokens_per_s"] / plain["tokens_per_s"]
        r["ttft_ratio_vs_plain_eft"] = r["ttft_ms"] / plain["ttft_ms"]
        acc = f"{r['accepted']}/{r['drafted']} kept, {r['accepted'] / r['blocks']:.2f} per block" if r["blocks"] else ""
        if r.get("fallbacks"):
            acc += f", {r['fallbacks']} fall-backs"
        print(
            f"{r['name']:62s} {r['tokens_per_s']:7.1f} {r['ratio_vs_plain_eft']:6.2f}x"
            f" {r['ttft_ms']:8.1f} {r['ttft_ratio_vs_plain_eft']:6.2f}x   {acc}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=40, help="new tokens per ignore-EOS request")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--no-service", action="store_true", help="in-process rows only (no Ray)")
    args = ap.parse_args()

    import torch

    from eft_serve.demo.family import ensure_demo_family

    torch.set_num_threads(1)
    family = ensure_demo_family()
    prompts = [q.prompt for q in family.world.held_out_questions()[: args.prompts]]
    print(f"\nSpeculative up-scaling, demo family, {args.tokens} tokens x {len(prompts)} prompts, one run")
    print(f"{'row':62s} {'tok/s':>7s} {'vs plain':>7s} {'TTFT ms':>8s} {'vs plain':>7s}   acceptance")
    rows = in_process_rows(family, prompts, args.tokens)
    for wname in workloads(prompts, args.tokens):
        report([r for r in rows if r["name"].startswith(f"in-process {wname},")], f"in-process {wname}, plain EFT")
    if not args.no_service:
        svc = service_rows(prompts, args.tokens)
        report(svc, "service, plain EFT")
        lb = next(r for r in svc if "large_base alone" in r["name"])
        spec = next(r for r in svc if "speculative" in r["name"])
        print(
            f"\nspeculative EFT / large base alone through the service, tok/s: {spec['tokens_per_s'] / lb['tokens_per_s']:.2f}"
        )
        rows += svc
    Path("bench-out").mkdir(exist_ok=True)
    Path("bench-out/speculative.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "ids"} for r in rows], indent=2)
    )


if __name__ == "__main__":
    main()
