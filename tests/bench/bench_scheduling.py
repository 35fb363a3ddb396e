"""The small pools' Linux scheduling policy (``replica.cpu_scheduling``), side by side in one stack.

Starts the local stack once with the default config over ``bench_engine``'s realistic-size random
GPT-2 family (large base 12 × 768, small pools 4 × 256, 50,257-token vocabulary), nothing pinned.
Each round streams the up-scaling recipe once per policy — the small pools' replica threads are
moved to that policy from here, by PID, just before (``infra.cpu_scheduling``, the call a replica
makes on itself at start-up) — and the large base alone once; the policies' order rotates round
by round, so a noisy neighbour's burst hits every policy alike. Prints, per stream count and
policy, EFT ÷ large base alone by tok/s (median rounds, and the median of each round's own
ratio), by decode tok/s and by ITL p50. Issue 19's target: ≤ 1.15 at 1 and 8 streams.

    .venv/bin/python tests/bench/bench_scheduling.py [--policies normal,batch,idle] [--streams 1,8]
                                                    [--repeats 5] [--tokens 32]

Moving threads back from ``idle`` to a higher policy needs root or CAP_SYS_NICE (Linux's rule for
unprivileged threads); without it, the bench says so and stops. Writes bench-out/scheduling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as engine_bench


def set_policy(roles: list[str], policy: Any) -> None:
    from eft_serve.infra.cpu_scheduling import use_scheduling_policy
    from eft_serve.testing.replica_processes import replica_processes

    for role in roles:
        pids = [proc.pid for proc in replica_processes(role)]
        if not pids:
            raise SystemExit(f"no replica process of pool {role!r} found")
        for pid in pids:
            try:
                use_scheduling_policy(policy, pid)
            except PermissionError:
                raise SystemExit(
                    f"moving pool {role!r} to {policy!r} needs root or CAP_SYS_NICE (it was lowered before)"
                ) from None


def ratios(eft: list[dict[str, Any]], large: list[dict[str, Any]]) -> dict[str, float]:
    """EFT's cost over the large base alone (>1: EFT slower), from rounds measured side by side."""
    e, lg = engine_bench.median_run(eft), engine_bench.median_run(large)
    return {
        "tok_s": lg["tok_s"] / e["tok_s"],
        "tok_s_paired": statistics.median(b["tok_s"] / a["tok_s"] for a, b in zip(eft, large)),
        "decode_tok_s": lg["decode_tok_s"] / e["decode_tok_s"],
        "itl_p50": e["itl_p50_ms"] / lg["itl_p50_ms"],
        "eft_itl_p50_ms": e["itl_p50_ms"],
        "large_itl_p50_ms": lg["itl_p50_ms"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="normal,batch,idle", help="comma list of normal, batch, idle")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    args = ap.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(key, value)
    if not hasattr(os, "SCHED_IDLE"):
        raise SystemExit("scheduling policies are Linux-only")
    from eft_serve.client import EftClient
    from eft_serve.infra.ports import free_port
    from eft_serve.stack import local_stack

    policies = [p for p in args.policies.split(",") if p]
    paths = engine_bench.build_family()
    cfg = engine_bench.bench_config(paths, {})
    small = [role for role in cfg.pools if role.startswith("small")]
    default = {cfg.pools[r].replica.cpu_scheduling for r in small}
    results: list[dict[str, Any]] = []
    with local_stack(cfg, http_port=free_port(), log=lambda m: print(f"[stack] {m}", flush=True)) as eff:
        address = f"127.0.0.1:{eff.grpc.port}"
        with EftClient(address, timeout=900) as client:
            for _ in client.generate(engine_bench.prompt(999, 8), max_new_tokens=2, ignore_eos=True, temperature=0):
                pass  # warm up every pool
        for n in (int(s) for s in args.streams.split(",") if s):
            rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in [*policies, "large_base"]}
            for rep in range(args.repeats):
                order = policies[rep % len(policies) :] + policies[: rep % len(policies)]
                for name in [*order, "large_base"]:
                    if name != "large_base":
                        set_policy(small, name)
                    recipe = "large_base" if name == "large_base" else "upscale"
                    r = engine_bench.drive(address, recipe, n, args.tokens, args.prompt_tokens, f"/{name}/{rep}")
                    rounds[name].append(r)
                    print(
                        f"[{name:>10s}] × {n:2d} (round {rep + 1}): {r['tok_s']:6.2f} tok/s, "
                        f"ITL p50 {r['itl_p50_ms']:.1f} ms, errors {len(r['errors'])}",
                        flush=True,
                    )
            for p in policies:
                results.append({"streams": n, "policy": p, **ratios(rounds[p], rounds["large_base"])})
    print(
        f"\nEFT ÷ large base alone, one stack, {args.repeats} interleaved rounds, {args.tokens} tokens a stream "
        f"(the config's own policy: {', '.join(sorted(default))})\n"
    )
    print(
        "| streams | small pools' policy | by tok/s | paired rounds | by decode tok/s | by ITL p50 | ITL p50 ms EFT / large |"
    )
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        print(
            f"| {r['streams']} | {r['policy']} | {r['tok_s']:.3f} | {r['tok_s_paired']:.3f} | {r['decode_tok_s']:.3f} | "
            f"{r['itl_p50']:.3f} | {r['eft_itl_p50_ms']:.1f} / {r['large_itl_p50_ms']:.1f} |"
        )
    engine_bench.OUT.mkdir(exist_ok=True)
    (engine_bench.OUT / "scheduling.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
