"""Result-cache speed-up: a repeated 64-token greedy request, cold vs fully cached, in one run.

Starts the stack (Ray, Serve, a local Redis started here), then per prompt: flush Redis, time the
request cold, then time the identical request again (every step served from Redis: no pool call).
Prints wall times, the speed-up ratio and the hit rate reported in the stream's usage.

    .venv/bin/python tests/bench/bench_cache.py [--tokens 64] [--prompts 4] [--repeats 3]

Writes bench-out/cache.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from eft_serve.infra.ports import free_port


def timed(client, prompt: str, n: int):
    t0 = time.perf_counter()
    text, final = [], None
    for msg in client.generate(prompt, temperature=0, max_new_tokens=n, ignore_eos=True):
        text.append(msg.text)
        if msg.HasField("usage"):
            final = msg
    return time.perf_counter() - t0, "".join(text), final.usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import redis

    from eft_serve.client import EftClient
    from eft_serve.config import EftConfig, demo_config
    from eft_serve.demo.family import ensure_demo_family
    from eft_serve.stack import local_stack

    family = ensure_demo_family()
    prompts = [q.prompt for q in family.world.held_out_questions()[: args.prompts]]
    data = demo_config().model_dump()
    data["grpc"]["port"] = free_port()
    data["ray"]["num_cpus"] = 8
    cfg = EftConfig.model_validate(data)
    rows = []
    with local_stack(cfg, http_port=free_port(), log=lambda m: print(f"[bench] {m}")) as eff:
        r = redis.Redis.from_url(eff.cache.url)
        with EftClient(f"127.0.0.1:{eff.grpc.port}", timeout=600) as client:
            timed(client, "warm up", 4)
            for p in prompts:
                for _ in range(args.repeats):
                    r.flushall()
                    cold_s, cold_text, cold_u = timed(client, p, args.tokens)
                    warm_s, warm_text, warm_u = timed(client, p, args.tokens)
                    assert warm_text == cold_text, "cached output must equal uncached output"
                    hits = warm_u.cache_hits / max(1, warm_u.cache_hits + warm_u.cache_misses)
                    rows.append(
                        {
                            "cold_s": cold_s,
                            "cached_s": warm_s,
                            "speedup": cold_s / warm_s,
                            "cached_hit_rate": hits,
                            "cached_pool_calls": warm_u.pool_calls,
                            "cold_pool_calls": cold_u.pool_calls,
                        }
                    )
        r.close()
    print(f"\nResult cache, {args.tokens}-token greedy requests, demo family, {len(rows)} cold/cached pairs, one run")
    print(
        f"{'cold s (median)':>16s} {'cached s (median)':>18s} {'speed-up (median)':>18s} {'speed-up (min)':>15s} {'hit rate':>9s}"
    )
    med = lambda k: statistics.median(x[k] for x in rows)  # noqa: E731
    print(
        f"{med('cold_s'):16.3f} {med('cached_s'):18.3f} {med('speedup'):18.2f} "
        f"{min(x['speedup'] for x in rows):15.2f} {min(x['cached_hit_rate'] for x in rows):9.3f}"
    )
    Path("bench-out").mkdir(exist_ok=True)
    Path("bench-out/cache.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
