"""Soak: mixed traffic with client cancels, a Redis restart and a killed pool replica.

Starts the local stack (Ray, Serve, demo family) with a Redis this script owns, records each
prompt's greedy answer, then for `--minutes` runs worker threads that each loop over a mix of:

- greedy: a 16-token greedy stream whose text must equal the answer recorded at the start
  (a different text is *wrong*: the cache, a retry or a restarted replica changed an answer),
- sampled: a 32-token stream with a fresh seed (the cache cannot absorb it),
- abandoned: a stream the client drops after its first token (cancellation path),
- timed out: a stream with a tiny `timeout_s` (DEADLINE_EXCEEDED path),
- bad: an unknown recipe, an over-long prompt, a negative timeout (error paths).

At a third of the run the Redis server is killed and restarted on its port (by PID, via
`LocalRedisServer`), at two thirds one pool replica process is SIGKILLed by PID (Serve starts a
new one). Every stream ends as one of: completed; failed cleanly (a status code the contract
allows for that kind, e.g. UNAVAILABLE while the replica is gone); wrong (a greedy text that
changed, or INTERNAL/UNKNOWN, or a code the kind must never get) — must be 0; hung (no answer
within the client's own deadline, well past the server's) — must be 0. It also samples the RSS of
every Serve replica process (start vs end) and good-request latency (first vs last quarter), and
checks health at the end. Exit status 1 when anything is wrong or hung or health is not SERVING.

    .venv/bin/python tests/bench/soak.py [--minutes 10] [--workers 4]

Writes bench-out/soak.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import statistics
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import psutil

from eft_serve.infra.ports import free_port

# Codes a stream of each kind may end with besides completing: while a replica is gone or Redis
# restarts, a request may fail cleanly (UNAVAILABLE, RESOURCE_EXHAUSTED, the server's deadline).
CHAOS = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
FAILS_CLEANLY = {
    "greedy": CHAOS,
    "sampled": CHAOS,
    "abandoned": CHAOS | {"CANCELLED"},
    "timed_out": CHAOS,
    "unknown_recipe": {"NOT_FOUND"},
    "huge_prompt": {"INVALID_ARGUMENT"},
    "negative_timeout": {"INVALID_ARGUMENT"},
}
# Kinds that must fail (a bad request that completes is wrong).
MUST_FAIL = {"unknown_recipe", "huge_prompt", "negative_timeout"}
SERVER_TIMEOUT_S = 30.0
CLIENT_DEADLINE_S = 90.0  # far past the server's timeout: no answer by then = hung
GREEDY_TOKENS = 16


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
    def __init__(self, address: str, expected: dict[str, str], minutes: float) -> None:
        self.address = address
        self.expected = expected  # prompt -> greedy text recorded at the start
        self.prompts = list(expected)
        self.deadline = time.monotonic() + minutes * 60
        self.t0 = time.monotonic()
        self.codes: dict[str, Counter[str]] = defaultdict(Counter)
        self.outcomes: Counter[str] = Counter()  # completed / failed_cleanly / wrong / hung
        self.wrong: list[str] = []
        self.good_latency: list[tuple[float, float]] = []  # (seconds since start, latency)
        self.lock = threading.Lock()
        self.seeds = itertools.count(50_000)

    def _record(self, kind: str, code: str, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.codes[kind][code] += 1
            self.outcomes[outcome] += 1
            if outcome == "wrong" and len(self.wrong) < 20:
                self.wrong.append(f"{kind}: {code} {detail}"[:300])

    def _one(self, client, kind: str, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
        prompt = rng.choice(self.prompts)
        with self.lock:
            seed = next(self.seeds)
        params: dict[str, object] = {"max_new_tokens": 32, "ignore_eos": True, "timeout_s": SERVER_TIMEOUT_S}
        if kind == "greedy":
            params.update(temperature=0.0, max_new_tokens=GREEDY_TOKENS)
        else:
            params.update(temperature=1.0, seed=seed)
        if kind == "unknown_recipe":
            params["recipe"] = "no-such-recipe"
        elif kind == "huge_prompt":
            prompt = "word " * 200_000
        elif kind == "negative_timeout":
            params["timeout_s"] = -1.0
        elif kind == "timed_out":
            params["timeout_s"] = 0.05
        t = time.monotonic()
        text: list[str] = []
        try:
            stream = client.generate(prompt, **params)
            for msg in stream:
                text.append(msg.text)
                if kind == "abandoned":
                    stream.cancel()
                    break
            code = "CANCELLED" if kind == "abandoned" else "OK"
        except grpc.RpcError as e:
            code = e.code().name
        elapsed = time.monotonic() - t
        if code == "DEADLINE_EXCEEDED" and elapsed >= CLIENT_DEADLINE_S - 1:
            self._record(kind, "CLIENT_DEADLINE", "hung", f"no answer in {elapsed:.0f}s")
            return
        if code in ("OK", "CANCELLED") and kind not in MUST_FAIL:
            if kind == "greedy" and "".join(text) != self.expected[prompt]:
                self._record(kind, code, "wrong", f"greedy text changed: {''.join(text)!r}")
                return
            if kind in ("greedy", "sampled"):
                with self.lock:
                    self.good_latency.append((t - self.t0, elapsed))
            self._record(kind, code, "completed")
        elif code in FAILS_CLEANLY[kind]:
            self._record(kind, code, "failed_cleanly")
        else:
            self._record(kind, code, "wrong", "unexpected status")

    def worker(self, index: int) -> None:
        from eft_serve.client import EftClient

        rng = random.Random(index)
        # Mostly good traffic, with every failure path exercised continuously.
        kinds = ["greedy"] * 3 + ["sampled"] * 3 + ["abandoned", "timed_out"]
        kinds += ["unknown_recipe", "huge_prompt", "negative_timeout"]
        with EftClient(self.address, timeout=CLIENT_DEADLINE_S) as client:
            while time.monotonic() < self.deadline:
                self._one(client, rng.choice(kinds), rng)


def kill_one_replica(role: str) -> int | None:
    """SIGKILL one Serve replica process of pool `role` (by PID); returns the PID killed."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "ray::ServeReplica" in cmd and role in cmd:
            os.kill(p.pid, signal.SIGKILL)
            return p.pid
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--sample-every-s", type=float, default=10.0)
    args = ap.parse_args()

    from eft_serve.cache.config import LocalRedisConfig
    from eft_serve.client import EftClient
    from eft_serve.config import EftConfig, demo_config
    from eft_serve.demo.family import ensure_demo_family
    from eft_serve.infra.redis_server import LocalRedisServer
    from eft_serve.stack import local_stack

    family = ensure_demo_family()
    prompts = [q.prompt for q in family.world.held_out_questions()[:8]]
    redis = LocalRedisServer(LocalRedisConfig()).start()  # ours, so the soak can restart it
    data = demo_config().model_dump()
    data["grpc"]["port"] = free_port()
    data["cache"]["url"] = redis.url
    cfg = EftConfig.model_validate(data)
    rss_samples: list[tuple[float, dict[str, int]]] = []
    events: list[str] = []
    try:
        with local_stack(cfg, http_port=free_port(), log=lambda m: print(f"[soak] {m}")) as eff:
            address = f"127.0.0.1:{eff.grpc.port}"
            with EftClient(address, timeout=600) as client:
                expected = {
                    p: "".join(
                        m.text
                        for m in client.generate(p, temperature=0.0, max_new_tokens=GREEDY_TOKENS, ignore_eos=True)
                    )
                    for p in prompts
                }
            soak = Soak(address, expected, args.minutes)
            threads = [threading.Thread(target=soak.worker, args=(i,), daemon=True) for i in range(args.workers)]
            for t in threads:
                t.start()
            span = args.minutes * 60
            chaos = [(span / 3, "redis"), (2 * span / 3, "replica")]
            while any(t.is_alive() for t in threads):
                now = time.monotonic() - soak.t0
                if chaos and now >= chaos[0][0]:
                    _, what = chaos.pop(0)
                    if what == "redis":
                        redis.kill()
                        time.sleep(2.0)  # the cache sees Redis down for a while
                        redis.restart()
                        events.append(f"{now:.0f}s: Redis killed, restarted 2 s later on {redis.url}")
                    else:
                        pid = kill_one_replica("small_ft")
                        events.append(f"{now:.0f}s: SIGKILL pool replica small_ft (pid {pid})")
                    print(f"[soak] {events[-1]}", flush=True)
                rss_samples.append((now, replica_rss()))
                for t in threads:
                    t.join(timeout=args.sample_every_s / len(threads))
            rss_samples.append((time.monotonic() - soak.t0, replica_rss()))
            with EftClient(address, timeout=120) as client:
                health = client.health()
                list(client.generate("still serving?", max_new_tokens=4))  # raises if the stack is broken
    finally:
        redis.stop()

    findings = []
    print(f"\nSoak: {args.minutes:g} min, {args.workers} workers, demo family, cache on (Redis)")
    for e in events:
        print(f"  event {e}")
    print(f"{'kind':18s} {'codes':60s}")
    for kind, codes in sorted(soak.codes.items()):
        print(f"{kind:18s} {dict(codes)}")
    o = soak.outcomes
    print(
        f"\nstreams: {sum(o.values())} — completed {o['completed']}, failed cleanly {o['failed_cleanly']}, "
        f"wrong {o['wrong']} (must be 0), hung {o['hung']} (must be 0)"
    )
    for w in soak.wrong:
        print(f"  wrong: {w}")
    if o["wrong"]:
        findings.append(f"{o['wrong']} wrong streams")
    if o["hung"]:
        findings.append(f"{o['hung']} hung streams")
    first, last = rss_samples[0][1], rss_samples[-1][1]
    print(f"\n{'replica (title#pid)':48s} {'RSS first MiB':>14s} {'RSS last MiB':>13s} {'growth':>7s}")
    growth = {}
    for name in sorted(set(first) - set(last)):
        print(f"{name:48s} {first[name] / 2**20:14.1f} {'(killed)':>13s}")
    for name in sorted(set(last) - set(first)):
        print(f"{name:48s} {'(new)':>14s} {last[name] / 2**20:13.1f}")
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
                "date": time.strftime("%Y-%m-%d"),
                "events": events,
                "outcomes": dict(soak.outcomes),
                "wrong": soak.wrong,
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
