"""What `bench_engine.py` records and prints: peak RSS per pool replica while a stack runs, and
the side-by-side table of configurations (tok/s, ITL, RSS, EFT ÷ large base)."""

from __future__ import annotations

import threading


class RssSampler:
    """Peak RSS per pool role, from the Serve replica processes ("ServeReplica:pool-<role>")."""

    def __init__(self, roles: list[str]) -> None:
        self.roles = roles
        self.peak = dict.fromkeys(roles, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        from eft_serve.testing.replica_processes import replica_processes

        while not self._stop.is_set():
            for role in self.roles:
                for proc in replica_processes(role):
                    try:
                        self.peak[role] = max(self.peak[role], proc.memory_info().rss)
                    except psutil.Error:
                        continue  # a replica that ended meanwhile
            self._stop.wait(0.5)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def table(configs: list[dict], streams: list[int]) -> str:
    lines = [
        "| config | recipe | streams | tok/s | decode tok/s | TTFT p50 s | ITL p50 ms | ITL p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in configs:
        for r in c["runs"]:
            lines.append(
                f"| {c['label']} | {r['recipe']} | {r['streams']} | {r['tok_s']:.2f} | {r['decode_tok_s']:.2f} | "
                f"{r.get('ttft_p50_s', float('nan')):.1f} | "
                f"{r['itl_p50_ms']:.0f} | {r['itl_p99_ms']:.0f} | {len(r['errors'])} |"
            )
    lines += [
        "",
        "| config | peak RSS large_base | small_base | small_ft | EFT ÷ large base per token: ITL p50 | "
        "by tok/s | by decode tok/s |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for c in configs:
        by = {(r["recipe"], r["streams"]): r for r in c["runs"]}
        ratios: dict[str, list[str]] = {"itl": [], "tok": [], "decode": []}
        for n in streams:
            if n in (1, 8) and ("upscale", n) in by and ("large_base", n) in by:
                base, eft = by[("large_base", n)], by[("upscale", n)]
                # At equal concurrency throughput is streams / ITL, so the ITL ratio is the cost
                # ratio per token in steady decoding; tok/s includes prefill, decode tok/s
                # counts from the first stream's first token (prefill stalls land in it).
                ratios["itl"].append(f"{n}: {eft['itl_p50_ms'] / max(1e-9, base['itl_p50_ms']):.2f}")
                ratios["tok"].append(f"{n}: {base['tok_s'] / max(1e-9, eft['tok_s']):.2f}")
                ratios["decode"].append(f"{n}: {base['decode_tok_s'] / max(1e-9, eft['decode_tok_s']):.2f}")
        rss = c["peak_rss"]
        lines.append(
            f"| {c['label']} | {rss.get('large_base', 0) / 2**30:.2f} GiB | {rss.get('small_base', 0) / 2**30:.2f} GiB | "
            f"{rss.get('small_ft', 0) / 2**30:.2f} GiB | {', '.join(ratios['itl'])} | {', '.join(ratios['tok'])} | "
            f"{', '.join(ratios['decode'])} |"
        )
    return "\n".join(lines)
