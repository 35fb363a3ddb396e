"""One-command accelerator bench: the engine and merge path on an 8B-shaped Llama family, in-process.

Run from the repository root on a machine with torch + transformers (no Ray, Redis, vLLM, gRPC,
protobuf or network needed, and the project need not be pip-installed: ``services/`` is put on
``sys.path`` here)::

    python tests/bench/gpu_bench.py            # CUDA: 8B + 1B pair, bf16; one table in < 10 min
    python tests/bench/gpu_bench.py --tiny     # tiny shapes on CPU, float32 (the unit test runs it)

Builds random-weight families in memory (no hub, nothing written to disk), Llama architecture:
``large_base`` Llama-3-8B-shaped (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336) and a
Llama-3.2-1B-shaped ``small_base`` / ``small_ft`` pair (2048, 16 layers, 32 / 8 heads, MLP 8192,
tied embeddings; ``small_ft`` is ``small_base`` plus noise). Every head has 128,256 rows over a
word-level tokenizer of 128,000 ids built here: 256 padded rows the engine cuts off
(``HFEngine`` treats ids ≥ len(tokenizer) as padding, as for Qwen2.5 or Pythia heads).

Measures through the real coordinator (``EftCoordinator`` over ``InProcessPool`` s: validation,
step fetch, per-token top-k merge, sampling, speculative verification, detokenising; result cache
off), greedy, ``ignore_eos``, different random prompts per stream, at each stream count:
``large alone`` (the large base's recipe), ``plain EFT`` (up-scaling), ``speculative EFT`` (the
server's speculative defaults; random models barely agree, so this is the low-agreement case;
its output is compared token for token with plain EFT's), and ``speculative EFT, agreeing
drafter`` (last: the two bases' output heads are zeroed, so the merge equals the drafter's own
distribution and nearly every draft is accepted; same shapes and forwards, the upper bound of
speculation). Prints one markdown table (tok/s, cost per token ÷ large alone, ITL p50/p99 as
tokens arrive, TTFT p50, acceptance) to paste into docs/benchmarks-gpu.md.

Budget: ``--budget-s`` (default 540 s, build included) is checked before each phase, and a phase
running past it is cut; rows not measured say so. Phase times go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "services") not in sys.path:
    sys.path.insert(0, str(ROOT / "services"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LARGE, PLAIN, SPEC, AGREE = "large alone", "plain EFT", "speculative EFT", "speculative EFT, agreeing drafter"
MODES = (LARGE, PLAIN, SPEC, AGREE)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool  # Llama-3.2-1B ties input and output embeddings; Llama-3-8B does not


@dataclass(frozen=True)
class Family:
    large: Shape
    small: Shape
    head_rows: int
    tokenizer_size: int
    init_std: float


# Llama 3's 128,000 regular tokens under its 128,256-row head (its 256 reserved ids left out).
FULL = Family(Shape(4096, 32, 32, 8, 14336, False), Shape(2048, 16, 32, 8, 8192, True), 128256, 128000, 0.02)
# A wider init in tiny mode: larger logit gaps, so float rounding never flips a greedy choice.
TINY = Family(Shape(64, 2, 4, 2, 128, False), Shape(32, 2, 4, 2, 64, True), 640, 600, 0.2)


@dataclass
class Row:
    mode: str
    streams: int
    tokens: int = 0
    wall_s: float = 0.0
    tok_s: float = 0.0
    itl_p50_ms: float = float("nan")
    itl_p99_ms: float = float("nan")
    ttft_p50_ms: float = float("nan")
    drafted: int = 0
    accepted: int = 0
    same_as_plain: str = ""
    note: str = ""
    ids: list[list[int]] = field(default_factory=list, repr=False)


def percentile_ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, int(q * len(s)))]


def build_tokenizer(size: int) -> Any:
    """A word-level tokenizer ``t0`` … ``t{size-2}``, ``<eos>``: ``size`` ids, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(size - 1)} | {"<eos>": size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="t0")


def build_model(shape: Shape, fam: Family, ctx: int, seed: int, dtype: Any, device: Any) -> Any:
    """A random-weight Llama built straight on ``device`` in ``dtype`` (no float32 copy first)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=fam.head_rows,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=ctx,
        rope_theta=500000.0,
        tie_word_embeddings=shape.tied,
        initializer_range=fam.init_std,
        bos_token_id=fam.tokenizer_size - 1,
        eos_token_id=fam.tokenizer_size - 1,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def perturbed(model: Any, std: float, seed: int) -> Any:
    """A "fine-tune" of ``model``: a copy with Gaussian noise on every weight matrix."""
    import torch

    ft = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            if p.ndim >= 2:
                p.add_(torch.randn_like(p) * std)
    return ft


def build_engine(
    model: Any, tokenizer: Any, vocab_fp: str, name: str, ctx: int, kv_bytes: int, batch_tokens: int
) -> Any:
    """An ``HFEngine`` over an in-memory model: the record ``HFEngine.load`` makes from a directory."""
    from eft_serve.engine.hf_engine import HFEngine
    from eft_serve.engine.types import ModelInfo

    head_rows = int(model.get_output_embeddings().weight.shape[0])
    in_rows = int(model.get_input_embeddings().weight.shape[0])
    support = len(tokenizer)  # the merge support is the tokenizer's ids; rows past it are padding
    assert support <= head_rows
    param = next(model.parameters())
    info = ModelInfo(
        name=name,
        vocab_size=support,
        max_context=ctx,
        eos_token_id=int(tokenizer.eos_token_id),
        vocab_fingerprint=vocab_fp,
        model_fingerprint=f"random-{name}",
        dtype=str(param.dtype).removeprefix("torch."),
        device=str(param.device),
        num_parameters=sum(p.numel() for p in model.parameters()),
        extra={"head_rows": str(head_rows), "attn_implementation": "sdpa"},
    )
    return HFEngine(
        model, info, kv_cache_bytes=kv_bytes, max_batch_tokens=batch_tokens, input_vocab_size=min(in_rows, support)
    )


def kv_bytes_per_token(shape: Shape, elem: int) -> int:
    return shape.layers * 2 * shape.kv_heads * (shape.hidden // shape.heads) * elem


def prompts(streams: int, n: int, size: int, tag: str) -> list[str]:
    """Different random prompts per stream; the same for every mode at one stream count."""
    out = []
    for i in range(streams):
        rng = random.Random(f"{tag}/{streams}/{i}")
        out.append(" ".join(f"t{rng.randrange(size - 1)}" for _ in range(n)))  # never <eos>
    return out


async def run_phase(coord: Any, mode: str, texts: list[str], tokens: int, timeout_s: float) -> Row:
    """``len(texts)`` concurrent greedy streams of ``tokens`` tokens; arrival times → figures."""
    from eft_serve.coordinator.request import GenerationRequest, MergeOptions, SpeculativeOptions

    streams = len(texts)
    row = Row(mode, streams)
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    row.ids = [[] for _ in range(streams)]
    firsts: list[float] = []
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        req = GenerationRequest(
            prompt=texts[i],
            merge=MergeOptions(recipe="large_base" if mode == LARGE else "upscale"),
            temperature=0.0,
            max_new_tokens=tokens,
            ignore_eos=True,
            speculative=SpeculativeOptions(enabled=mode in (SPEC, AGREE)),
            timeout_s=max(1.0, timeout_s),
        )
        async for chunk in await coord.generate(req):
            now = time.perf_counter()
            if chunk.tokens and not arrivals[i]:
                firsts.append(now - t0)
            arrivals[i].extend([now] * len(chunk.tokens))
            row.ids[i].extend(t.token_id for t in chunk.tokens)
            if chunk.usage is not None:
                row.drafted += chunk.usage.speculation.drafted_tokens
                row.accepted += chunk.usage.speculation.accepted_tokens

    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(streams))), timeout=max(0.1, timeout_s))
    except TimeoutError:
        row.note = "cut: over budget"
    except Exception as e:  # reported in the table (and the exit status)
        row.note = f"error: {type(e).__name__}: {e}"[:160]
    row.wall_s = time.perf_counter() - t0
    row.tokens = sum(len(a) for a in arrivals)
    row.tok_s = row.tokens / row.wall_s if row.wall_s > 0 else 0.0
    gaps = [t1 - t0_ for times in arrivals for t0_, t1 in zip(times, times[1:]) if t1 > t0_]
    row.itl_p50_ms, row.itl_p99_ms = percentile_ms(gaps, 0.5), percentile_ms(gaps, 0.99)
    row.ttft_p50_ms = percentile_ms(firsts, 0.5)
    return row


def zero_heads(engines: dict[str, Any], roles: tuple[str, ...]) -> None:
    """Flat distributions from ``roles``: the up-scaling merge becomes the drafter's own."""
    import torch

    with torch.no_grad():
        for role in roles:
            engines[role].model.get_output_embeddings().weight.zero_()


def params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def fmt(x: float, digits: int = 1) -> str:
    return "—" if x != x else f"{x:.{digits}f}"  # nan → dash


def table(rows: list[Row]) -> str:
    large = {r.streams: r.tok_s for r in rows if r.mode == LARGE and r.tok_s > 0}
    head = (
        "| mode | streams | tokens | wall s | tok/s | cost ÷ large | ITL p50 ms | ITL p99 ms | TTFT p50 ms "
        "| accepted / drafted | same tokens as plain | note |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        cost = large[r.streams] / r.tok_s if r.streams in large and r.tok_s > 0 else float("nan")
        acc = f"{r.accepted} / {r.drafted}" if r.mode in (SPEC, AGREE) else ""
        lines.append(
            f"| {r.mode} | {r.streams} | {r.tokens} | {fmt(r.wall_s, 2)} | {fmt(r.tok_s)} | {fmt(cost, 2)} "
            f"| {fmt(r.itl_p50_ms, 2)} | {fmt(r.itl_p99_ms, 2)} | {fmt(r.ttft_p50_ms)} | {acc} "
            f"| {r.same_as_plain} | {r.note} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU, float32): a smoke run")
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cuda:N or cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default), float16, float32 (--tiny default)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per stream (128; --tiny 8)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (128; --tiny 16)")
    ap.add_argument("--streams", default="1,8,32", help="comma-separated concurrent stream counts")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall budget, build included")
    ap.add_argument("--no-agree", action="store_true", help="skip the agreeing-drafter rows")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    args.streams = sorted({int(s) for s in args.streams.split(",") if s.strip()})
    if not args.streams or min(args.streams) < 1:
        ap.error("--streams needs positive counts, e.g. 1,8,32")
    args.tokens = args.tokens or (8 if args.tiny else 128)
    args.prompt_tokens = args.prompt_tokens or (16 if args.tiny else 128)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    return args


def main(argv: list[str] | None = None) -> tuple[int, list[Row]]:
    args = parse_args(argv)
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)
    import torch
    import transformers

    from eft_serve.config import AccessLogConfig, CoordinatorConfig, RecipeConfig
    from eft_serve.coordinator.service import EftCoordinator
    from eft_serve.engine.fingerprint import vocab_fingerprint
    from eft_serve.engine.hf_engine import DTYPES, resolve_device
    from eft_serve.transport.inprocess import InProcessPool

    device = resolve_device(args.device)
    if device.type == "cpu" and not args.tiny and args.device == "auto":
        print("no CUDA device here: the 8B-shaped family needs one (or --tiny, or --device cpu)", file=sys.stderr)
        return 2, []
    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread per engine, as replicas run (DESIGN.md §3)
    dtype = DTYPES[args.dtype]
    fam = TINY if args.tiny else FULL
    ctx = args.prompt_tokens + args.tokens + 96  # room for a draft block past the last token
    max_streams = max(args.streams)
    elem = torch.empty((), dtype=dtype).element_size()

    def log(msg: str) -> None:
        print(f"[gpu-bench {time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    tokenizer = build_tokenizer(fam.tokenizer_size)
    vocab_fp = vocab_fingerprint(tokenizer)  # one tokenizer for all three: hashed once
    batch_tokens = max(8192, max_streams * (args.prompt_tokens + 16))
    engines: dict[str, Any] = {}
    for role, shape, seed in (("large_base", fam.large, 0), ("small_base", fam.small, 1)):
        # Every live stream's KV (prompt + tokens + headroom) three times over: warm-up and earlier
        # phases' sequences stay idle in the store, and a stream may grow before they are evicted.
        kv = max(64 << 20, 3 * max_streams * ctx * kv_bytes_per_token(shape, elem))
        model = build_model(shape, fam, ctx, seed, dtype, device)
        engines[role] = build_engine(model, tokenizer, vocab_fp, role, ctx, kv, batch_tokens)
        if role == "small_base":
            ft = perturbed(model, 0.1 * fam.init_std, seed=2)
            engines["small_ft"] = build_engine(ft, tokenizer, vocab_fp, "small_ft", ctx, kv, batch_tokens)
        log(f"built {role}: {params(engines[role].info.num_parameters)} params, layout {engines[role].kv_layout}")
    build_s = time.perf_counter() - started

    recipes = {
        "upscale": RecipeConfig(base="large_base", experts=["small_ft"], reference="small_base"),
        "large_base": RecipeConfig(base="large_base"),
    }
    cfg = CoordinatorConfig(
        health_probe_period_s=3600.0,  # no probe forwards between a phase's steps
        access_log=AccessLogConfig(enabled=False),
        max_new_tokens_cap=max(512, args.tokens),
        pool_call_timeout_s=max(30.0, args.budget_s),
    )
    coord = EftCoordinator({r: InProcessPool(e, r) for r, e in engines.items()}, recipes, tokenizer, cfg)
    rows: list[Row] = []

    def left() -> float:
        return float(args.budget_s) - (time.perf_counter() - started)

    async def phase(mode: str, streams: int, tokens: int, tag: str) -> Row | None:
        if left() <= 0:
            return None
        t = time.perf_counter()
        row = await run_phase(
            coord, mode, prompts(streams, args.prompt_tokens, fam.tokenizer_size, tag), tokens, left()
        )
        log(f"{tag} {mode}, {streams} streams: {time.perf_counter() - t:.1f}s {row.note}")
        return row

    async def run() -> None:
        await coord.start()
        try:
            for s in args.streams:  # warm-up: kernels for every batch shape and path, CUDA caches
                for mode in (LARGE, PLAIN, SPEC):
                    await phase(mode, s, min(2, args.tokens), "warm-up")
            modes = [LARGE, PLAIN, SPEC]
            for s in args.streams:  # stream-major: a cut budget still leaves whole groups
                for mode in modes:
                    row = await phase(mode, s, args.tokens, "measure")
                    rows.append(row or Row(mode, s, note="skipped: over budget"))
            if not args.no_agree:
                zero_heads(engines, ("large_base", "small_base"))
                for s in args.streams:
                    row = await phase(AGREE, s, args.tokens, "measure")
                    rows.append(row or Row(AGREE, s, note="skipped: over budget"))
        finally:
            await coord.stop()

    asyncio.run(run())
    plain = {r.streams: r.ids for r in rows if r.mode == PLAIN and not r.note}
    for r in rows:
        if r.mode == SPEC and not r.note and r.streams in plain:
            same = sum(a == b for a, b in zip(r.ids, plain[r.streams]))
            r.same_as_plain = f"{same} / {r.streams}"

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = (
        f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    )
    print(f"device: {name} ({device}); torch {torch.__version__}, transformers {transformers.__version__}")
    print(
        f"family: {'tiny' if args.tiny else 'Llama-3-8B + Llama-3.2-1B pair'} shapes, random weights, {args.dtype}, "
        f"heads {fam.head_rows} rows over a {fam.tokenizer_size}-id tokenizer; large "
        f"{params(engines['large_base'].info.num_parameters)}, small {params(engines['small_base'].info.num_parameters)}"
    )
    print(
        f"workload: greedy, ignore_eos, {args.prompt_tokens}-token prompts, {args.tokens} new tokens per stream, "
        f"top-k {cfg.default_logprob_top_k} merge, in-process coordinator, KV layout "
        f"{'/'.join(sorted({e.kv_layout for e in engines.values()}))}; build {build_s:.0f}s, "
        f"total {time.perf_counter() - started:.0f}s{peak}"
    )
    top = max((t for r in rows for ids in r.ids for t in ids), default=-1)
    print(f"padded head rows never generated: {'yes' if top < fam.tokenizer_size else 'NO'} (largest id {top})")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) | {"ids": None} for r in rows], indent=1))
    return (1 if any(r.note.startswith("error") for r in rows) else 0), rows


if __name__ == "__main__":
    sys.exit(main()[0])
