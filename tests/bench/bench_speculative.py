"""Speculative up-scaling vs plain up-scaling vs the large base alone, side by side in one run.

Rows (demo family, greedy, N new tokens per held-out prompt, ignore EOS, result cache off):
  in-process  plain EFT, speculative EFT (adaptive, max 8), speculative EFT (fixed block 4)
  service     the large base alone, plain EFT, speculative EFT (adaptive, max 8) — one stream each
Each row prints tokens/s, its ratio to plain EFT in the same setting, and for speculative rows the
acceptance (drafted, accepted, mean accepted length per block). Speculative output is checked to be
token-for-token the plain output (the coupled acceptance rule) before any figure is printed.

    .venv/bin/python tests/bench/bench_speculative.py [--tokens 64] [--prompts 4] [--no-service]

Writes bench-out/speculative.json. The service part starts and stops its own Ray cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any


def _row(name: str, tokens: int, wall: float, ids: list[list[int]], usage: dict[str, float]) -> dict[str, Any]:
    return {"name": name, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ids": ids, **usage}


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
        "in-process, plain EFT": SpeculativeOptions(enabled=False),
        "in-process, speculative EFT (adaptive, max 8)": SpeculativeOptions(enabled=True, max_draft_tokens=8),
        "in-process, speculative EFT (block 4)": SpeculativeOptions(enabled=True, max_draft_tokens=4, adaptive=False),
    }

    async def run() -> list[dict[str, Any]]:
        await coord.start()
        rows = []
        for name, spec in variants.items():
            t0, count, ids = time.perf_counter(), 0, []
            drafted = accepted = blocks = 0
            for p in prompts:
                req = GenerationRequest(prompt=p, temperature=0, max_new_tokens=n, ignore_eos=True, speculative=spec)
                stream = await coord.generate(req)
                seq: list[int] = []
                async for c in stream:
                    seq += [t.token_id for t in c.tokens]
                    if c.usage is not None:
                        s = c.usage.speculation
                        drafted, accepted, blocks = (
                            drafted + s.drafted_tokens,
                            accepted + s.accepted_tokens,
                            blocks + s.speculative_blocks,
                        )
                count += len(seq)
                ids.append(seq)
            usage = {"drafted": drafted, "accepted": accepted, "blocks": blocks}
            rows.append(_row(name, count, time.perf_counter() - t0, ids, usage))
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
    rows = []
    with local_stack(svc, http_port=free_port(), log=lambda m: print(f"[bench] {m}")):
        with EftClient(f"127.0.0.1:{svc.grpc.port}", timeout=600) as client:
            for kw in variants.values():  # warm-up every path once
                client.complete(prompts[0], temperature=0, max_new_tokens=4, **kw)
            for name, kw in variants.items():
                t0, count, ids = time.perf_counter(), 0, []
                drafted = accepted = blocks = 0
                for p in prompts:
                    r = client.complete(p, temperature=0, max_new_tokens=n, ignore_eos=True, **kw)
                    ids.append(list(r.token_ids))
                    count += len(r.token_ids)
                    drafted += r.usage.drafted_tokens
                    accepted += r.usage.accepted_tokens
                    blocks += r.usage.speculative_blocks
                usage = {"drafted": drafted, "accepted": accepted, "blocks": blocks}
                rows.append(_row(name, count, time.perf_counter() - t0, ids, usage))
    return rows


def report(rows: list[dict[str, Any]], plain_name: str) -> None:
    plain = next(r for r in rows if r["name"] == plain_name)
    for r in rows:
        if "speculative" in r["name"]:
            assert r["ids"] == plain["ids"], f"{r['name']}: output differs from plain decoding"
        r["ratio_vs_plain_eft"] = r["tokens_per_s"] / plain["tokens_per_s"]
        acc = f"{r['accepted']}/{r['drafted']} kept, {r['accepted'] / r['blocks']:.2f} per block" if r["blocks"] else ""
        print(f"{r['name']:46s} {r['tokens_per_s']:8.1f} {r['ratio_vs_plain_eft']:14.2f}   {acc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--no-service", action="store_true", help="in-process rows only (no Ray)")
    args = ap.parse_args()

    import torch

    from eft_serve.demo.family import ensure_demo_family

    torch.set_num_threads(1)
    family = ensure_demo_family()
    prompts = [q.prompt for q in family.world.held_out_questions()[: args.prompts]]
    print(f"\nSpeculative up-scaling, demo family, greedy, {args.tokens} tokens x {len(prompts)} prompts, one run")
    print(f"{'row':46s} {'tok/s':>8s} {'vs plain EFT':>14s}   acceptance")
    rows = in_process_rows(family, prompts, args.tokens)
    report(rows, "in-process, plain EFT")
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
