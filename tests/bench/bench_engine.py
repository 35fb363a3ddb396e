"""Engine throughput under concurrency through the whole stack: 1 / 8 / 32 streams, side by side.

Builds a realistic-size random GPT-2 family once (no model hub): large_base 12 layers × 768,
small_base and small_ft 4 × 256, context 1024, a GPT-2-sized (50,257-token) word-level tokenizer
built locally; random weights, saved with ``save_pretrained``. Then, per configuration, starts the
local stack (Ray, Serve, the three pools and the coordinator — what ``eft serve --config`` runs,
result cache off), streams ~200-token prompts (different per stream) greedily with
``ignore_eos`` at 1, 8 and 32 concurrent streams, for the up-scaling recipe and for the large base
alone, and prints, side by side: aggregate tok/s, inter-token latency p50/p99, peak RSS of each
pool's replica, and EFT ÷ large-base-alone cost per token at 1 and 8 streams (by ITL p50, by
tok/s and by decode tok/s).

Configurations (one stack each, in one run):
* ``hf`` — this tree, default config (``kv_cache_bytes: null``: sized from memory, admission);
* ``hf, 64 MiB`` — this tree, the old default budget set explicitly (admission queues instead
  of thrashing);
* ``HEAD, 64 MiB`` (``--before``, default on) — the last commit's engine and its old default,
  run from ``git archive HEAD`` in a child process: the measured 8-stream collapse;
* ``hf at REF`` (``--baseline-ref REF``) — a git ref's tree at its default settings, in a child
  process (e.g. the commit before a change, measured side by side with it);
* ``vllm`` — when ``--engines`` names it *and* ``PoolConfig`` has an ``engine`` field *and*
  ``vllm`` imports; otherwise skipped with a note.

    .venv/bin/python tests/bench/bench_engine.py [--quick] [--engines hf,vllm] [--streams 1,8,32]
                                                [--step-cost | --contention | --arrivals]
                                                [--tokens 48] [--no-before] [--baseline-ref REF]
                                                [--repeats 5]

``--quick``: 12 tokens a stream. ``--repeats N``: N rounds per stream count, the recipes alternating
round by round; each row is the median round (one 32-token stream moves ±10 % run to run here). Figures are noisy on a shared machine: compare the ratios
measured side by side in one run. Writes bench-out/engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench-out"
OLD_DEFAULT = 64 * 2**20

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine_family import CONTEXT, VOCAB, build_family, percentile_ms, prompt  # noqa: E402  (sibling script modules)
from bench_engine_report import RssSampler, table  # noqa: E402
from bench_engine_steps import contention, step_cost  # noqa: E402


def drive(address: str, recipe: str, streams: int, tokens: int, prompt_tokens: int, run: str = "") -> dict[str, Any]:
    """``streams`` concurrent greedy streams; per-token arrival times → tok/s and ITL."""
    from eft_serve.client import EftClient

    times: list[list[float]] = [[] for _ in range(streams)]
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            with EftClient(address, timeout=900) as client:
                for msg in client.generate(
                    prompt(i, prompt_tokens, f"{recipe}/{streams}{run}"),
                    recipe=recipe,
                    temperature=0,
                    max_new_tokens=tokens,
                    ignore_eos=True,
                ):
                    now = time.perf_counter()
                    times[i].extend([now] * len(msg.tokens))
        except Exception as e:  # reported in the table
            errors.append(f"{type(e).__name__}: {getattr(e, 'code', lambda: '')()}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(len(t) for t in times)
    gaps = sorted(b - a for t in times for a, b in zip(t, t[1:]) if b > a)
    # Decode rate: tokens after each stream's first, over the time from the first first-token on.
    firsts = [t[0] for t in times if t]
    ends = [t[-1] for t in times if t]
    decode = sum(max(0, len(t) - 1) for t in times) / max(1e-9, max(ends) - min(firsts)) if firsts else 0.0
    ttft = sorted(f - t0 for f in firsts)
    return {
        "ttft_p50_s": ttft[len(ttft) // 2] if ttft else float("nan"),
        "recipe": recipe,
        "streams": streams,
        "tokens": total,
        "wall_s": wall,
        "tok_s": total / wall,
        "decode_tok_s": decode,
        "itl_p50_ms": percentile_ms(gaps, 0.5),
        "itl_p99_ms": percentile_ms(gaps, 0.99),
        "errors": errors,
    }


def bench_config(paths: dict[str, str], pool_settings: dict[str, Any]) -> Any:
    """The demo config serving `paths`, each pool with `pool_settings`, result cache off, on a
    free port, with deadlines long enough for 32 streams on 2 cores. Sets only the keys given,
    so an older tree (`--baseline-ref`) accepts it."""
    from eft_serve.config import EftConfig, demo_config
    from eft_serve.infra.ports import free_port

    data = demo_config().model_dump()
    for role, path in paths.items():
        data["pools"][role].update({"model": path, **pool_settings})
    data["cache"]["enabled"] = False
    data["grpc"]["port"] = free_port()
    data["ray"]["num_cpus"] = 8
    data["coordinator"]["default_timeout_s"] = 600.0
    data["coordinator"]["pool_call_timeout_s"] = 120.0
    return EftConfig.model_validate(data)


def pinned_layout(cfg: Any) -> tuple[Any, set[int]]:
    """`cfg` with the large base's replica on the first CPU this process may use and the small
    pools and coordinator on the others (the k8s layout — each pool on its own node group — in
    miniature), and the CPUs for everything else (Ray, the bench's clients)."""
    cpus = sorted(os.sched_getaffinity(0))
    large, rest = cpus[:1], cpus[1:]
    data = cfg.model_dump()
    for role, pool in data["pools"].items():
        pool["replica"]["cpu_affinity"] = large if role == "large_base" else rest
    data["coordinator"]["replica"]["cpu_affinity"] = rest
    return type(cfg).model_validate(data), set(rest)


def run_config(
    label: str,
    paths: dict[str, str],
    kv: int | None,
    engine: str,
    args: argparse.Namespace,
    streams: list[int],
    pinned: bool = False,
) -> dict:
    from eft_serve.infra.ports import free_port
    from eft_serve.stack import local_stack

    cfg = bench_config(paths, {"kv_cache_bytes": kv} | ({"engine": engine} if engine != "hf" else {}))
    unpinned = os.sched_getaffinity(0)
    if pinned:
        cfg, others = pinned_layout(cfg)
        # Ray's processes and this bench's client threads start from this thread: they inherit it.
        os.sched_setaffinity(0, others)
    try:
        with local_stack(cfg, http_port=free_port(), log=lambda m: print(f"[{label}] {m}", flush=True)) as eff:
            runs, peak = measure_stack(label, f"127.0.0.1:{eff.grpc.port}", paths, args, streams)
    finally:
        os.sched_setaffinity(0, unpinned)
    return {"label": label, "kv_cache_bytes": kv, "engine": engine, "runs": runs, "peak_rss": peak}


def measure_stack(
    label: str, address: str, paths: dict[str, str], args: argparse.Namespace, streams: list[int]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Both recipes at each stream count against a running stack; the pools' peak RSS."""
    from eft_serve.client import EftClient

    runs = []
    with EftClient(address, timeout=900) as client:
        for _ in client.generate(prompt(999, 8), max_new_tokens=2, ignore_eos=True, temperature=0):
            pass  # warm up every pool
    with RssSampler(list(paths)) as rss:
        for n in streams:
            rounds: dict[str, list[dict[str, Any]]] = {"upscale": [], "large_base": []}
            # Rounds alternate the recipes, so a noisy neighbour's burst hits both alike.
            for rep in range(args.repeats):
                for recipe in rounds:
                    r = drive(address, recipe, n, args.tokens, args.prompt_tokens, f"/r{rep}")
                    print(
                        f"[{label}] {recipe:>10s} × {n:2d} (round {rep + 1}): {r['tok_s']:6.2f} tok/s "
                        f"(decode {r['decode_tok_s']:6.2f}), ITL p50 {r['itl_p50_ms']:.0f} ms "
                        f"p99 {r['itl_p99_ms']:.0f} ms, errors {len(r['errors'])}",
                        flush=True,
                    )
                    rounds[recipe].append(r)
            runs += [median_run(rs) for rs in rounds.values()]
    return runs, dict(rss.peak)


def median_run(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a recipe's rounds: the median of each figure, every round's errors."""
    import statistics

    row = dict(rounds[0])
    for key in ("tok_s", "decode_tok_s", "itl_p50_ms", "itl_p99_ms", "ttft_p50_s", "wall_s", "tokens"):
        row[key] = statistics.median(r[key] for r in rounds)
    row["errors"] = [e for r in rounds for e in r["errors"]]
    row["rounds"] = len(rounds)
    return row


def arrivals(paths: dict[str, str], chunk: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """8 streams decoding while 4 long prompts (`--arrival-tokens`) arrive 2 s apart: the
    decoders' inter-token latency meanwhile, and the newcomers' TTFT (chunked prefill on or off)."""
    from eft_serve.client import EftClient
    from eft_serve.infra.ports import free_port
    from eft_serve.stack import local_stack

    cfg = bench_config(paths, {"max_prefill_tokens_per_turn": chunk})
    label = f"chunks of {chunk}" if chunk else "whole prefills"
    with local_stack(cfg, http_port=free_port(), log=lambda m: print(f"[{label}] {m}", flush=True)) as eff:
        address = f"127.0.0.1:{eff.grpc.port}"
        times: dict[str, list[float]] = {}
        started: dict[str, float] = {}

        def stream(name: str, prompt_text: str, tokens: int, delay: float) -> None:
            time.sleep(delay)
            times[name] = []
            started[name] = time.perf_counter()
            with EftClient(address, timeout=900) as client:
                for msg in client.generate(prompt_text, temperature=0, max_new_tokens=tokens, ignore_eos=True):
                    times[name].extend([time.perf_counter()] * len(msg.tokens))

        threads = [
            threading.Thread(target=stream, args=(f"d{i}", prompt(i, 64, f"arr{chunk}"), 150, 0.0)) for i in range(8)
        ]
        threads += [
            threading.Thread(
                target=stream, args=(f"n{i}", prompt(100 + i, args.arrival_tokens, f"arr{chunk}"), 4, 8.0 + 2 * i)
            )
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    window = (min(started[f"n{i}"] for i in range(4)), max(times[f"n{i}"][0] for i in range(4)))
    gaps = sorted(
        b - a for i in range(8) for a, b in zip(times[f"d{i}"], times[f"d{i}"][1:]) if window[0] <= b <= window[1]
    )
    ttft = sorted(times[f"n{i}"][0] - started[f"n{i}"] for i in range(4))
    ends = sorted(times[f"d{i}"][-1] for i in range(8))
    return {
        "label": label,
        "decoders_end_after_window_s": round(ends[0] - window[1], 1),
        "itl_p50_ms": percentile_ms(gaps, 0.5),
        "itl_p99_ms": percentile_ms(gaps, 0.99),
        "itl_max_ms": percentile_ms(gaps, 1.0),
        "decoder_tokens_in_window": len(gaps),
        "newcomer_ttft_s": [round(t, 2) for t in ttft],
    }


def run_before_in_child(
    args: argparse.Namespace, ref: str = "HEAD", label: str = "HEAD, 64 MiB", old_budget: bool = True
) -> dict | None:
    """A git ref's tree in a child process: by default the last commit's engine at the old 64 MiB
    budget (`--before`); with `old_budget=False` (`--baseline-ref`) at its default settings."""
    resolved = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True)
    if resolved.returncode != 0:
        print(f"[bench] no git {ref} to compare with: {resolved.stderr.decode()[:200]}")
        return None
    sha = resolved.stdout.decode().strip()[:12]
    # Keyed by commit, not by ref name: HEAD moves, and a stale tree would be measured silently.
    head = OUT / f"eft_{sha}"
    if not (head / "services" / "eft_serve").is_dir():
        head.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "services", "clients"], cwd=ROOT, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(head)], input=archive.stdout, check=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{head / 'services'}{os.pathsep}{head / 'clients' / 'python'}"
    out = OUT / f"engine_before_{sha}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child-before",
        str(out),
        "--tokens",
        str(args.tokens),
        "--repeats",
        str(args.repeats),
    ]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--child-label", f"{label} ({sha[:7]})"]
    if old_budget:
        cmd += ["--streams", ",".join(str(s) for s in args.streams if s <= 8)]
    else:
        cmd += ["--streams", ",".join(map(str, args.streams)), "--child-auto-kv"]
    if subprocess.run(cmd, env=env, cwd=ROOT).returncode != 0:
        print(f"[bench] the {ref} run failed (see its output above)")
        return None
    result: dict = json.loads(out.read_text())
    return result


def vllm_note(engines: list[str]) -> str | None:
    if "vllm" not in engines:
        return None
    from eft_serve.config import PoolConfig

    if "engine" not in PoolConfig.model_fields:
        return "vllm skipped: PoolConfig has no `engine` field in this tree"
    try:
        import vllm  # noqa: F401
    except Exception as e:
        return f"vllm skipped: `import vllm` failed ({type(e).__name__}: {e})"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="12 tokens a stream")
    ap.add_argument("--engines", default="hf", help="comma list: hf, vllm")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument(
        "--repeats", type=int, default=1, help="rounds per stream count (recipes alternate); rows are medians"
    )
    ap.add_argument("--no-before", action="store_true", help="skip the HEAD (old engine) run")
    ap.add_argument("--no-64mib", action="store_true", help="skip this tree at the old 64 MiB budget")
    ap.add_argument("--step-cost", action="store_true", help="only the in-process rows-vs-gather step cost")
    ap.add_argument(
        "--contention", action="store_true", help="only: the large base's step alone vs beside the small engines"
    )
    ap.add_argument(
        "--baseline-ref", default=None, help="also run this git ref's tree at its default settings, side by side"
    )
    ap.add_argument(
        "--arrivals", action="store_true", help="only: decoders' ITL while long prompts arrive, chunked prefill on/off"
    )
    ap.add_argument("--arrival-tokens", type=int, default=800, help="prompt length of the arriving streams")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="also: the default config with the large base on CPU 0 and the rest on the other CPUs",
    )
    ap.add_argument("--table", default=None, help="only: print the tables of a saved bench-out JSON")
    ap.add_argument("--child-before", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-label", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-auto-kv", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.quick:
        args.tokens = 12
    args.streams = [int(s) for s in str(args.streams).split(",") if s]
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print(table(saved["configs"], args.streams))
        return
    OUT.mkdir(exist_ok=True)
    paths = build_family()

    # The old 64 MiB budget runs at most 8 streams: at 32 the HEAD engine thrashes for tens of minutes.
    small = [s for s in args.streams if s <= 8]
    if args.step_cost:
        for batch in (1, 8):
            cost = step_cost(paths, batch, 4 if args.quick else 10, args.prompt_tokens)
            print(
                f"large_base decode step, batch {batch}, {args.prompt_tokens}-token pasts: rows {cost['rows']:.0f} ms, "
                f"gather {cost['gather']:.0f} ms (gather/rows {cost['gather'] / cost['rows']:.2f}; past positions "
                f"copied a step: rows {cost['rows_gathered_tokens_per_step']:.0f}, "
                f"gather {cost['gather_gathered_tokens_per_step']:.0f})",
                flush=True,
            )
        return
    if args.arrivals:
        rows = [arrivals(paths, chunk, args) for chunk in (None, 256)]
        print("\n| prefill | decoders' ITL p50 ms | p99 ms | max ms | decoder tokens meanwhile | newcomers' TTFT s |")
        print("|---|---:|---:|---:|---:|---|")
        for r in rows:
            print(
                f"| {r['label']} | {r['itl_p50_ms']:.0f} | {r['itl_p99_ms']:.0f} | {r['itl_max_ms']:.0f} | "
                f"{r['decoder_tokens_in_window']} | {' / '.join(map(str, r['newcomer_ttft_s']))} |"
            )
        (OUT / "arrivals.json").write_text(json.dumps(rows, indent=1))
        return
    if args.contention:
        for row in contention(paths, 10 if args.quick else 40, args.prompt_tokens):
            beside = ", ".join(f"{r} {ms:.1f} ms" for r, ms in row.items() if r != "large_base") or "alone"
            print(f"large_base decode step {row['large_base']:.1f} ms ({beside})", flush=True)
        return
    if args.child_before:
        label = args.child_label or "HEAD, 64 MiB"
        res = run_config(label, paths, None if args.child_auto_kv else OLD_DEFAULT, "hf", args, args.streams)
        Path(args.child_before).write_text(json.dumps(res))
        return

    engines = [e for e in args.engines.split(",") if e]
    configs = [run_config("hf (auto KV)", paths, None, "hf", args, args.streams)] if "hf" in engines else []
    note = vllm_note(engines)
    if note:
        print(f"[bench] {note}", flush=True)
    elif "vllm" in engines:
        configs.append(run_config("vllm", paths, None, "vllm", args, args.streams))
    if "hf" in engines and args.pin:
        if len(os.sched_getaffinity(0)) < 2:
            print("[bench] --pin needs at least 2 CPUs; skipped", flush=True)
        else:
            configs.append(run_config("hf, pinned", paths, None, "hf", args, args.streams, pinned=True))
    if "hf" in engines and not args.no_64mib:
        configs.append(run_config("hf, 64 MiB", paths, OLD_DEFAULT, "hf", args, small))
    if "hf" in engines and not args.no_before:
        before = run_before_in_child(args)
        if before:
            configs.append(before)
    if args.baseline_ref:
        baseline = run_before_in_child(args, args.baseline_ref, f"hf at {args.baseline_ref}", old_budget=False)
        if baseline:
            configs.append(baseline)

    print(
        f"\nEngine bench: random GPT-2 family (large 12×768, small 4×256, vocab {VOCAB}, ctx {CONTEXT}), "
        f"{args.prompt_tokens}-token prompts, {args.tokens} new tokens a stream, greedy, result cache off\n"
    )
    print(table(configs, args.streams))
    if note:
        print(f"\n{note}")
    (OUT / "engine.json").write_text(json.dumps({"configs": configs, "note": note, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
