"""`eft plan`: how many replicas each pool needs for a request rate and a per-token latency target.

Owns the sizing arithmetic of `docs/sizing.md` and its printout: a decode step of a replica costs
a fixed part (reading its share of the weights) plus a part per sequence in the batch (reading
that sequence's KV, and its share of the matmuls); the latency target caps the batch, KV memory
and the engine's batch limit cap it too; Little's law gives the streams in flight; a replica's
prefill throughput adds the prompt load. Pool step costs are roofline estimates from the GPU's
bandwidth and FLOPs unless measured ones are given (`step_ms=FIXED+PER_SEQ`). The coordinator's
per-token cost is the one measured on the development machine (`docs/benchmarks.md`).
Knows nothing about Ray, Serve or the config tree: it only reads numbers.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Gpu:
    memory_gb: float
    bandwidth_tbs: float  # HBM, peak
    tflops: float  # dense bf16, peak


GPUS = {
    "a100-80gb": Gpu(80, 2.04, 312),
    "h100-80gb": Gpu(80, 3.35, 989),
    "h200": Gpu(141, 4.8, 989),
    "l40s": Gpu(48, 0.864, 362),
}


@dataclass(frozen=True)
class PoolSpec:
    role: str
    params_b: float  # parameters, billions
    tp: int = 1  # GPUs per replica (tensor parallel)
    kv_kib_per_token: float = 512.0  # 2 (K, V) · layers · KV heads · head dim · bytes
    dtype_bytes: int = 2
    max_batch: int = 64  # the engine's own limit (vLLM max_num_seqs, HF max_batch_size)
    step_ms: tuple[float, float] | None = None  # measured (fixed, per sequence); None = roofline


# Llama-2-70B: 80 layers, 8 KV heads (GQA) × 128 → 320 KiB a token; Llama-2-7B: 32 layers,
# 32 heads × 128 → 512 KiB a token (no GQA: the small pools hold more KV per token than the large).
PAPER_SETUP = (
    PoolSpec("large_base", params_b=68.98, tp=4, kv_kib_per_token=320),
    PoolSpec("small_base", params_b=6.74, tp=1, kv_kib_per_token=512),
    PoolSpec("small_ft", params_b=6.74, tp=1, kv_kib_per_token=512),
)


@dataclass(frozen=True)
class Workload:
    rate_rps: float
    prompt_tokens: int
    output_tokens: int
    itl_ms: float  # target time between tokens of one stream


@dataclass(frozen=True)
class Assumptions:
    bandwidth_efficiency: float = 0.7  # achieved / peak HBM bandwidth in a decode step
    flops_efficiency: float = 0.4  # achieved / peak FLOPs (prefill, and the matmul share of decode)
    gpu_memory_utilization: float = 0.9  # vLLM's default
    # Measured (docs/benchmarks.md): coordinator merge + sampling + the hops, per token of a stream.
    overhead_ms: float = 5.0
    coordinator_cpu_ms_per_token: float = 5.0
    coordinator_cpus: float = 1.0  # per coordinator replica (deploy/prod.yaml)
    coordinator_utilization: float = 0.6


@dataclass
class PoolPlan:
    role: str
    fixed_ms: float
    per_seq_ms: float
    batch: int
    limited_by: str
    step_ms: float
    decode_replicas: float
    prefill_replicas: float
    replicas: int
    gpus: int
    lines: list[str] = field(default_factory=list)


@dataclass
class Plan:
    workload: Workload
    streams: float
    pools: list[PoolPlan]
    coordinator_replicas: int
    overhead_ms: float
    lines: list[str]

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in self.pools)

    @property
    def itl_ms(self) -> float:
        """The per-token latency at full batches: the slowest pool's step plus the overhead."""
        return max(p.step_ms for p in self.pools) + self.overhead_ms


def step_cost(spec: PoolSpec, gpu: Gpu, context: float, a: Assumptions) -> tuple[float, float]:
    """(fixed, per sequence) milliseconds of one decode step of one replica."""
    if spec.step_ms is not None:
        return spec.step_ms
    bandwidth = gpu.bandwidth_tbs * 1e12 * a.bandwidth_efficiency * spec.tp  # shards read in parallel
    flops = gpu.tflops * 1e12 * a.flops_efficiency * spec.tp
    weights = spec.params_b * 1e9 * spec.dtype_bytes
    kv = spec.kv_kib_per_token * 1024 * context
    return 1e3 * weights / bandwidth, 1e3 * (kv / bandwidth + 2 * spec.params_b * 1e9 / flops)


def plan(workload: Workload, pools: tuple[PoolSpec, ...], gpu: Gpu, a: Assumptions = Assumptions()) -> Plan:
    w = workload
    budget = w.itl_ms - a.overhead_ms
    if budget <= 0:
        raise ValueError(f"the ITL target ({w.itl_ms} ms) must exceed the per-token overhead ({a.overhead_ms} ms)")
    context = w.prompt_tokens + w.output_tokens / 2  # mean context over a stream's decode
    peak_context = w.prompt_tokens + w.output_tokens
    # Little's law: streams in flight = rate × time a stream is open, counted at the target ITL (an
    # upper bound: where full batches step faster than the target, streams close sooner).
    streams = w.rate_rps * w.output_tokens * w.itl_ms / 1e3
    lines = [
        f"streams in flight = rate × output tokens × ITL = {w.rate_rps:g} × {w.output_tokens} × "
        f"{w.itl_ms / 1e3:g} s = {streams:.1f}",
        f"step budget = ITL − overhead = {w.itl_ms:g} − {a.overhead_ms:g} = {budget:g} ms "
        "(the pools of a step run in parallel: the slowest sets the pace)",
    ]
    plans = []
    for spec in pools:
        fixed, per_seq = step_cost(spec, gpu, context, a)
        if fixed >= budget:
            raise ValueError(
                f"{spec.role}: one step costs {fixed:.1f} ms before any sequence, over the {budget:g} ms "
                "budget: raise the ITL target or the pool's tensor parallelism"
            )
        by_latency = math.floor((budget - fixed) / per_seq)
        kv_room = gpu.memory_gb * 1e9 * a.gpu_memory_utilization * spec.tp - spec.params_b * 1e9 * spec.dtype_bytes
        by_memory = math.floor(max(kv_room, 0) / (spec.kv_kib_per_token * 1024 * peak_context))
        batch, limited_by = min((by_latency, "latency"), (by_memory, "KV memory"), (spec.max_batch, "max batch"))
        if batch < 1:
            raise ValueError(f"{spec.role}: not one sequence fits ({limited_by}); add GPUs per replica")
        prefill_tps = gpu.tflops * 1e12 * a.flops_efficiency * spec.tp / (2 * spec.params_b * 1e9)
        decode = streams / batch
        prefill = w.rate_rps * w.prompt_tokens / prefill_tps
        replicas = max(1, math.ceil(decode + prefill))
        p = PoolPlan(
            spec.role, fixed, per_seq, batch, limited_by, fixed + batch * per_seq, decode, prefill,
            replicas, replicas * spec.tp,
        )  # fmt: skip
        p.lines = [
            f"step = {fixed:.1f} ms + b × {per_seq:.3f} ms; batch b = min(latency {by_latency}, "
            f"KV memory {by_memory}, max batch {spec.max_batch}) = {batch} ({limited_by})",
            f"replicas = streams / b + prompt tokens/s / prefill tokens/s = {streams:.1f} / {batch} + "
            f"{w.rate_rps * w.prompt_tokens:.0f} / {prefill_tps:.0f} = {decode:.2f} + {prefill:.2f} "
            f"→ {replicas} replica(s) × {spec.tp} GPU(s) = {replicas * spec.tp} GPU(s)",
        ]
        plans.append(p)
    cpu = w.rate_rps * w.output_tokens * a.coordinator_cpu_ms_per_token / 1e3
    coordinators = max(2, math.ceil(cpu / (a.coordinator_cpus * a.coordinator_utilization)))
    lines.append(
        f"coordinator CPUs = tokens/s × CPU per token = {w.rate_rps * w.output_tokens:.0f} × "
        f"{a.coordinator_cpu_ms_per_token:g} ms = {cpu:.2f}; at {a.coordinator_utilization:.0%} of "
        f"{a.coordinator_cpus:g} CPU each → {coordinators} replicas (at least 2: no single point of failure)"
    )
    return Plan(w, streams, plans, coordinators, a.overhead_ms, lines)


def format_plan(p: Plan) -> str:
    out = [*p.lines, ""]
    out.append(f"{'pool':12s} {'step ms':>8s} {'batch':>6s} {'limited by':>11s} {'replicas':>9s} {'GPUs':>5s}")
    for pool in p.pools:
        out.append(
            f"{pool.role:12s} {pool.step_ms:>8.1f} {pool.batch:>6d} {pool.limited_by:>11s} {pool.replicas:>9d} {pool.gpus:>5d}"
        )
    out.append(f"{'coordinator':12s} {'':>8s} {'':>6s} {'':>11s} {p.coordinator_replicas:>9d} {'-':>5s}")
    out.append(
        f"total GPUs: {p.gpus}; per-token latency at full batches ≈ {p.itl_ms:.1f} ms (target {p.workload.itl_ms:g})"
    )
    out.append("")
    for pool in p.pools:
        out.extend(f"{pool.role}: {line}" for line in pool.lines)
    return "\n".join(out)


def parse_pool(text: str, pools: tuple[PoolSpec, ...]) -> tuple[PoolSpec, ...]:
    """Apply `ROLE:key=value,...` (params_b, tp, kv_kib_per_token, max_batch, step_ms=F+P) to `pools`."""
    role, _, rest = text.partition(":")
    known = {p.role: p for p in pools}
    spec = known.get(role, PoolSpec(role, params_b=0))
    changes: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--pool {text!r}: {item!r} is not key=value")
        if key == "step_ms":
            fixed, plus, per_seq = value.partition("+")
            if not plus:
                raise ValueError(f"--pool {text!r}: step_ms is FIXED+PER_SEQ milliseconds, e.g. 24+0.3")
            changes[key] = (float(fixed), float(per_seq))
        elif key in ("tp", "max_batch", "dtype_bytes"):
            changes[key] = int(value)
        elif key in ("params_b", "kv_kib_per_token"):
            changes[key] = float(value)
        else:
            raise ValueError(
                f"--pool {text!r}: unknown key {key!r} (params_b, tp, kv_kib_per_token, max_batch, step_ms)"
            )
    spec = replace(spec, **changes)
    if spec.params_b <= 0:
        raise ValueError(f"--pool {text!r}: a new pool needs params_b")
    return tuple(spec if p.role == role else p for p in pools) + (() if role in known else (spec,))


def add_parser(sub: Any) -> None:
    """Register `eft plan` on the CLI's subcommands."""
    p = sub.add_parser("plan", help="replicas per pool for a request rate and latency target (docs/sizing.md)")
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="mean prompt length (default %(default)s)")
    p.add_argument("--output-tokens", type=int, default=256, help="mean generated tokens (default %(default)s)")
    p.add_argument("--itl-ms", type=float, default=100.0, help="target ms between tokens (default %(default)s)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="a100-80gb", help="GPU type (default %(default)s)")
    p.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="ROLE:KEY=VALUE,...",
        help="change or add a pool of the paper-scale setup (Llama-2-70B TP 4 + the 7B pair): params_b, tp, "
        "kv_kib_per_token, max_batch, step_ms=FIXED+PER_SEQ (measured ms)",
    )
    p.add_argument("--overhead-ms", type=float, default=Assumptions.overhead_ms, help="per-token coordinator + hops")
    p.add_argument(
        "--coordinator-cpu-ms",
        type=float,
        default=Assumptions.coordinator_cpu_ms_per_token,
        help="coordinator CPU per generated token (default: measured, %(default)s)",
    )
    p.add_argument(
        "--coordinator-cpus", type=float, default=Assumptions.coordinator_cpus, help="CPUs per coordinator replica"
    )
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        pools: tuple[PoolSpec, ...] = PAPER_SETUP
        for text in args.pool:
            pools = parse_pool(text, pools)
        result = plan(
            Workload(args.rate, args.prompt_tokens, args.output_tokens, args.itl_ms),
            pools,
            GPUS[args.gpu],
            Assumptions(
                overhead_ms=args.overhead_ms,
                coordinator_cpu_ms_per_token=args.coordinator_cpu_ms,
                coordinator_cpus=args.coordinator_cpus,
            ),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result))
    return 0
