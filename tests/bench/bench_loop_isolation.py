"""Latency isolation: decoding streams' inter-token latency while maximum-size prompts arrive.

In one process, one run: the demo family's three up-scaling models (real HF engines, in-process
pools) behind an `EftCoordinator`. Eight greedy streams decode continuously; their ITL p50/p99
are measured alone, and while a maximum-size prompt (``coordinator.max_prompt_bytes``, 256 KiB)
arrives every second. Each such prompt costs ~0.2 s of tokenizer CPU and is then refused for the
models' context (as it would be on most real models): the load is the tokenizing. Two
coordinators over the same engines, side by side (rounds interleave the cells):

* ``on the loop``  - ``tokenizer_workers: 0, merge_workers: 0`` (what the coordinator did before);
* ``off the loop`` - the default config (tokenizing and chat rendering on a worker thread);
* ``control``      - the off-the-loop coordinator with no big requests, while another process
  tokenizes the same prompt at the same rate: the ITL cost of the tokenizing's CPU alone, which
  no in-process design avoids (on a 2-core box shared with other work it is most of the cost).

Also printed: the longest event-loop stall seen by a 5 ms ticker in each phase, and the GIL check
behind the thread pool (a 256 KiB encode inline, through transformers in a thread, and through
the raw `tokenizers` call that keeps the GIL).

Target: under load, ITL p99 <= 1.5 x its value alone (off the loop).

    .venv/bin/python tests/bench/bench_loop_isolation.py [--seconds 5] [--rounds 3] [--streams 8] [--rate 1]

Writes bench-out/loop_isolation.json. Figures are noisy on a shared machine: compare the
ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench-out"
MODES = {"on the loop": {"tokenizer_workers": 0, "merge_workers": 0}, "off the loop": {}}
CONTROL = "control"  # the off-the-loop coordinator while the same tokenizing runs in another process


def percentile_ms(values: list[float], q: float) -> float:
    """The q-quantile of seconds, in ms (nan when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LoopLag:
    """A task ticking every 5 ms; `max_s` is the longest extra wait between two ticks."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            self.max_s = max(self.max_s, now - last - 0.005)
            last = now

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick())

    async def stop(self) -> float:
        await asyncio.sleep(0.02)
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.max_s


def big_prompt(texts: list[str], max_bytes: int) -> str:
    """Natural demo-world text, just under `max_bytes` of UTF-8."""
    rng = random.Random(0)
    parts: list[str] = []
    size = 0
    while size < max_bytes - 512:
        t = rng.choice(texts) + " "
        parts.append(t)
        size += len(t.encode())
    return "".join(parts)[: max_bytes - 512]


async def gil_check(tok: Any, text: str) -> list[dict[str, Any]]:
    """Loop stall while a 256 KiB prompt is encoded: inline, and in a thread (two ways)."""
    loop = asyncio.get_running_loop()
    rows = []
    with ThreadPoolExecutor(1) as pool:
        cases = [
            ("inline on the loop", None),
            ("transformers encode, in a thread", lambda: tok.encode(text)),
            ("raw tokenizers .encode, in a thread", lambda: tok.backend_tokenizer.encode(text).ids),
        ]
        for name, fn in cases:
            lag = LoopLag()
            lag.start()
            await asyncio.sleep(0.02)
            t0 = time.perf_counter()
            for _ in range(3):
                if fn is None:
                    tok.encode(text)
                    await asyncio.sleep(0.01)
                else:
                    await loop.run_in_executor(pool, fn)
            took = (time.perf_counter() - t0) / 3
            rows.append({"case": name, "encode_ms": 1000 * took, "max_loop_stall_ms": 1000 * await lag.stop()})
    return rows


Load = Callable[[float], Awaitable[dict[str, int]]]  # runs until the given perf_counter time; outcomes


def request_load(coord: Any, text: str, rate: float) -> Load:
    """`text` sent to the coordinator as a prompt `rate` times a second (each awaited concurrently)."""
    from eft_serve.coordinator.request import GenerationRequest
    from eft_serve.errors import EftError

    async def run(end: float) -> dict[str, int]:
        outcomes: dict[str, int] = {}

        async def send_big() -> None:
            try:
                async for _ in await coord.generate(GenerationRequest(prompt=text, max_new_tokens=1)):
                    pass
                outcomes["served"] = outcomes.get("served", 0) + 1
            except EftError as e:
                outcomes[e.status.name] = outcomes.get(e.status.name, 0) + 1

        sent: list[asyncio.Task[None]] = []
        t = time.perf_counter()
        while t < end - 0.3:
            sent.append(asyncio.create_task(send_big()))
            t += 1.0 / rate
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
        await asyncio.gather(*sent)
        return outcomes

    return run


def _tokenize_on_command(path: str, text: str, conn: Any) -> None:
    """Child process: on each (seconds, rate) message, encode `text` `rate` times a second; reply the count."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        seconds, rate = msg
        t = time.perf_counter()
        end, count = t + seconds, 0
        while t < end - 0.3:
            tok.encode(text)
            count += 1
            t += 1.0 / rate
            time.sleep(max(0.0, t - time.perf_counter()))
        conn.send(count)


class ProcessTokenizer:
    """The control: the same tokenizing in another process (no GIL, no event loop), only its CPU."""

    def __init__(self, path: str, text: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_tokenize_on_command, args=(path, text, child), daemon=True)
        self._proc.start()
        assert self._conn.recv() == "ready"

    def load(self, rate: float) -> Load:
        async def run(end: float) -> dict[str, int]:
            self._conn.send((end - time.perf_counter(), rate))
            return {"encoded elsewhere": await asyncio.to_thread(self._conn.recv)}

        return run

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(10)


async def phase(coord: Any, prompts: list[str], streams: int, seconds: float, load: Load | None) -> dict:
    """`streams` greedy streams decoding for `seconds`, with `load` running meanwhile."""
    from eft_serve.coordinator.request import GenerationRequest

    gaps: list[float] = []  # inter-token latencies, seconds
    tokens = 0
    end = time.perf_counter() + seconds
    outcomes: dict[str, int] = {}

    async def stream(i: int) -> None:
        nonlocal tokens
        while time.perf_counter() < end:
            req = GenerationRequest(prompt=prompts[i % len(prompts)], temperature=0, max_new_tokens=96, ignore_eos=True)
            last: float | None = None
            async for chunk in await coord.generate(req):
                if chunk.tokens:
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)  # inter-token latency (TTFT excluded)
                    last = now
                    tokens += len(chunk.tokens)

    async def loaded() -> None:
        if load is not None:
            outcomes.update(await load(end))

    lag = LoopLag()
    lag.start()
    t0 = time.perf_counter()
    await asyncio.gather(*(stream(i) for i in range(streams)), loaded())
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "gaps": gaps, "stall_s": await lag.stop(), "big_prompts": outcomes}


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One (mode, phase) cell over its rounds: tok/s, ITL percentiles, longest stall, prompt outcomes."""
    gaps = [g for r in runs for g in r["gaps"]]
    outcomes: dict[str, int] = {}
    for r in runs:
        for k, v in r["big_prompts"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    return {
        "tok_per_s": sum(r["tokens"] for r in runs) / sum(r["wall_s"] for r in runs),
        "itl_p50_ms": percentile_ms(gaps, 0.5),
        "itl_p99_ms": percentile_ms(gaps, 0.99),
        "itl_max_ms": percentile_ms(gaps, 1.0),
        "itl_count": len(gaps),
        "max_loop_stall_ms": 1000 * max(r["stall_s"] for r in runs),
        "big_prompts": outcomes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each measured phase")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all cells")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--rate", type=float, default=1.0, help="maximum-size prompts per second under load")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from eft_serve.config import demo_config
    from eft_serve.coordinator.service import EftCoordinator
    from eft_serve.demo.family import ensure_demo_family
    from eft_serve.engine.hf_engine import HFEngine
    from eft_serve.transport.inprocess import InProcessPool

    torch.set_num_threads(1)
    family = ensure_demo_family()
    cfg = demo_config()
    tok = AutoTokenizer.from_pretrained(family.paths["large_base"])
    prompts = [q.prompt for q in family.world.held_out_questions()]
    text = big_prompt(prompts, cfg.coordinator.max_prompt_bytes)
    roles = ("large_base", "small_base", "small_ft")
    engines = {r: HFEngine.load(family.paths[r], name=r, device="cpu") for r in roles}

    async def run() -> dict[str, Any]:
        result: dict[str, Any] = {"gil": await gil_check(tok, text), "modes": {}}
        coords = {}
        for mode, overrides in MODES.items():
            pools = {r: InProcessPool(e, r) for r, e in engines.items()}
            coords[mode] = EftCoordinator(pools, cfg.recipes, tok, cfg.coordinator.model_copy(update=overrides))
            await coords[mode].start()
            await phase(coords[mode], prompts, args.streams, 2.0, None)  # warm-up
        control = ProcessTokenizer(family.paths["large_base"], text)
        cells: list[tuple[str, str, Any, Load | None]] = []
        for mode, coord in coords.items():
            cells += [(mode, "alone", coord, None), (mode, "load", coord, request_load(coord, text, args.rate))]
        # The control: the off-the-loop coordinator while the same tokenizing runs in another
        # process. What it loses is the CPU the tokenizing takes, which no in-process design avoids.
        cells.append(("off the loop", CONTROL, coords["off the loop"], control.load(args.rate)))
        # Rounds interleave the cells so the machine's background load, which drifts on a shared
        # box, weighs on all of them alike.
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for i in range(args.rounds):
            for mode, name, coord, load in cells:
                runs.setdefault((mode, name), []).append(await phase(coord, prompts, args.streams, args.seconds, load))
            print(f"[bench] round {i + 1}/{args.rounds} done", flush=True)
        control.close()
        for coord in coords.values():
            await coord.stop()
        for (mode, name), rs in runs.items():
            result["modes"].setdefault(mode, {})[name] = merge_runs(rs)
        for mode, name in [(m, "load") for m in coords] + [("off the loop", CONTROL)]:
            # Each round's own ratio, alone and loaded measured seconds apart: robust to a noisy round.
            pairs = zip(runs[(mode, "alone")], runs[(mode, name)])
            result["modes"][mode][f"{name}_round_ratios"] = [
                percentile_ms(loaded["gaps"], 0.99) / percentile_ms(alone["gaps"], 0.99) for alone, loaded in pairs
            ]
        return result

    result = asyncio.run(run())
    size = len(text.encode())
    print(f"\nGIL check: one {size}-byte prompt encoded 3 times, longest event-loop stall (5 ms ticker)")
    print(f"{'case':40s} {'encode ms':>10s} {'max stall ms':>13s}")
    for r in result["gil"]:
        print(f"{r['case']:40s} {r['encode_ms']:10.0f} {r['max_loop_stall_ms']:13.1f}")
    print(
        f"\n{args.streams} greedy streams (demo family, upscale, in-process), {args.rounds} x {args.seconds:g} s a cell; "
        f"load = one {size}-byte prompt every {1 / args.rate:g} s"
    )
    head = f"{'mode':14s} {'phase':8s} {'tok/s':>7s} {'ITL p50':>8s} {'ITL p99':>8s} {'ITL max':>8s} {'stall':>7s}  big prompts"
    print(head + "   (latencies and longest loop stall in ms)")
    for mode, phases in result["modes"].items():
        for name in ("alone", "load", CONTROL):
            if name not in phases:
                continue
            r = phases[name]
            print(
                f"{mode:14s} {name:8s} {r['tok_per_s']:7.1f} {r['itl_p50_ms']:8.1f} {r['itl_p99_ms']:8.1f} "
                f"{r['itl_max_ms']:8.1f} {r['max_loop_stall_ms']:7.1f}  {r['big_prompts'] or '-'}"
            )
    print("\nITL p99 under load / alone (target <= 1.5 off the loop): all rounds pooled; median of the rounds' own")
    for mode, phases in result["modes"].items():
        for name in ("load", CONTROL):
            if name not in phases:
                continue
            ratio = phases[name]["itl_p99_ms"] / phases["alone"]["itl_p99_ms"]
            per_round = phases[f"{name}_round_ratios"]
            phases[f"{name}_p99_ratio"] = ratio
            phases[f"{name}_p99_ratio_median_round"] = statistics.median(per_round)
            rounds = " ".join(f"{x:.2f}" for x in per_round)
            label = f"{mode}, {name}"
            print(f"  {label:24s} {ratio:5.2f}   {statistics.median(per_round):5.2f}   (rounds: {rounds})")
    OUT.mkdir(exist_ok=True)
    (OUT / "loop_isolation.json").write_text(json.dumps({"args": vars(args), "prompt_bytes": size, **result}, indent=2))


if __name__ == "__main__":
    main()
