"""Soak: mixed good, abandoned, timed-out and bad traffic against the real stack for a while.

Starts the local stack (Ray, Serve, local Redis, demo family), then for `--minutes` runs worker
threads that each loop over a mix of requests:

- good: a sampled 32-token stream (fresh seed, so the cache cannot absorb it),
- abandoned: a stream the client drops after its first token (cancellation path),
- timed out: a stream with a tiny `timeout_s` (DEADLINE_EXCEEDED path),
- bad: an unknown recipe, an over-long prompt, a negative timeout (error paths).

Every few seconds it samples the resident memory of every Serve replica process and the good
requests' latency. At the end it prints: status codes per kind (anything other than the expected
code is a finding, and INTERNAL always is), RSS per replica at the first and last sample with the
growth ratio, good-request latency p50 in the first and last quarter of the run (drift), and the
gRPC health verdict. Exit status 1 when a kind got an unexpected code or health is not SERVING.

    .venv/bin/python tests/bench/soak.py [--minutes 10] [--workers 4]

Writes bench-out/soak.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import psutil

from eft_serve.infra.ports import free_port

# What each kind of request must end with (the service's contract); anything else is a finding.
EXPECTED = {
    "good": {"OK"},
    "abandoned": {"OK", "CANCELLED"},
    "timed_out": {"OK", "DEADLINE_EXCEEDED"},
    "unknown_recipe": {"NOT_FOUND"},
    "huge_prompt": {"INVALID_ARGUMENT"},
    "negative_timeout": {"INVALID_ARGUMENT"},
}


def replica_rss() -> dict[str, int]:
    """RSS in bytes of every Serve replica process on this machine, by its process title."""
    out: dict[str, int] = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "ray::ServeReplica" in cmd and p.info.get("memory_info") is not None:
            title = cmd.split()[0].removeprefix("ray::ServeReplica:")
            out[f"{title}#{p.pid}"] = p.info["memory_info"].rss
    return out


class Soak:
    def __init__(self, address: str, prompts: list[str], minutes: float) -> None:
        self.address = address
        self.prompts = prompts
        self.deadline = time.monotonic() + minutes * 60
        self.t0 = time.monotonic()
        self.codes: dict[str, Counter[str]] = defaultdict(Counter)
        self.good_latency: list[tuple[float, float]] = []  # (seconds since start, latency)
        self.lock = threading.Lock()
        self.seeds = itertools.count(50_000)

    def _record(self, kind: str, code: str) -> None:
        with self.lock:
            self.codes[kind][code] += 1

    def _one(self, client, kind: str, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
        prompt = rng.choice(self.prompts)
        with self.lock:
            seed = next(self.seeds)
        params: dict[str, object] = {"temperature": 1.0, "seed": seed, "max_new_tokens": 32, "ignore_eos": True}
        if kind == "unknown_recipe":
            params["recipe"] = "no-such-recipe"
        elif kind == "huge_prompt":
            prompt = "word " * 200_000
        elif kind == "negative_timeout":
            params["timeout_s"] = -1.0
        elif kind == "timed_out":
            params["timeout_s"] = 0.05
        t = time.monotonic()
        try:
            stream = client.generate(prompt, **params)
            for _ in stream:
                if kind == "abandoned":
                    stream.cancel()
                    break
            code = "CANCELLED" if kind == "abandoned" else "OK"
        except grpc.RpcError as e:
            code = e.code().name
        if kind == "good" and code == "OK":
            with self.lock:
                self.good_latency.append((t - self.t0, time.monotonic() - t))
        self._record(kind, code)

    def worker(self, index: int) -> None:
        from eft_serve.client import EftClient

        rng = random.Random(index)
        # Mostly good traffic, with every failure path exercised continuously.
        kinds = ["good"] * 6 + ["abandoned", "timed_out", "unknown_recipe", "huge_prompt", "negative_timeout"]
        with EftClient(self.address, timeout=120) as client:
            while time.monotonic() < self.deadline:
                self._one(client, rng.choice(kinds), rng)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--sample-every-s", type=float, default=10.0)
    args = ap.parse_args()

    from eft_serve.client import EftClient
    from eft_serve.config import EftConfig, demo_config
    from eft_serve.demo.family import ensure_demo_family
    from eft_serve.stack import local_stack

    family = ensure_demo_family()
    prompts = [q.prompt for q in family.world.held_out_questions()[:16]]
    data = demo_config().model_dump()
    data["grpc"]["port"] = free_port()
    cfg = EftConfig.model_validate(data)
    rss_samples: list[tuple[float, dict[str, int]]] = []
    with local_stack(cfg, http_port=free_port(), log=lambda m: print(f"[soak] {m}")) as eff:
        address = f"127.0.0.1:{eff.grpc.port}"
        with EftClient(address, timeout=600) as client:
            list(client.generate("warm up", max_new_tokens=4))
        soak = Soak(address, prompts, args.minutes)
        threads = [threading.Thread(target=soak.worker, args=(i,), daemon=True) for i in range(args.workers)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss_samples.append((time.monotonic() - soak.t0, replica_rss()))
            for t in threads:
                t.join(timeout=args.sample_every_s / len(threads))
        rss_samples.append((time.monotonic() - soak.t0, replica_rss()))
        with EftClient(address, timeout=30) as client:
            health = client.health()
            list(client.generate("still serving?", max_new_tokens=4))  # raises if the stack is broken

    findings = []
    print(f"\nSoak: {args.minutes:g} min, {args.workers} workers, demo family")
    print(f"{'kind':18s} {'codes':60s}")
    for kind, codes in sorted(soak.codes.items()):
        print(f"{kind:18s} {dict(codes)}")
        unexpected = set(codes) - EXPECTED[kind]
        if unexpected:
            findings.append(f"{kind}: unexpected codes {sorted(unexpected)}")
    first, last = rss_samples[0][1], rss_samples[-1][1]
    print(f"\n{'replica':48s} {'RSS first MiB':>14s} {'RSS last MiB':>13s} {'growth':>7s}")
    growth = {}
    for name in sorted(set(first) & set(last)):
        growth[name] = last[name] / first[name]
        print(f"{name:48s} {first[name] / 2**20:14.1f} {last[name] / 2**20:13.1f} {growth[name]:7.3f}")
    lat = soak.good_latency
    span = max((t for t, _ in lat), default=0.0)
    early = [x for t, x in lat if t <= span / 4]
    late = [x for t, x in lat if t >= 3 * span / 4]
    drift = statistics.median(late) / statistics.median(early) if early and late else float("nan")
    if early and late:
        print(
            f"\ngood-request latency p50: first quarter {statistics.median(early):.3f} s, "
            f"last quarter {statistics.median(late):.3f} s, ratio {drift:.2f}"
        )
    print(f"health at the end: {health} (1 = SERVING)")
    if health != 1:
        findings.append(f"health is {health}, not SERVING")
    print("findings: " + ("; ".join(findings) if findings else "none"))
    out = Path("bench-out")
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(
        json.dumps(
            {
                "minutes": args.minutes,
                "workers": args.workers,
                "codes": {k: dict(v) for k, v in soak.codes.items()},
                "rss_growth": growth,
                "latency_drift": drift,
                "health": health,
                "findings": findings,
            },
            indent=2,
        )
    )
    raise SystemExit(1 if findings else 0)


if __name__ == "__main__":
    main()
