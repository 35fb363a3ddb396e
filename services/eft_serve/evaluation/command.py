"""`eft eval`: run the held-out evaluation through the service and write `docs/results`.

Owns the choreography: pick the questions, reach a service (`--address`, or start the full-family
stack on free loopback ports and stop it afterwards), run the conditions, measure top-k accuracy
in-process (after the stack is gone, so the two do not share the CPUs), then print the tables and
write CSV/PNG/JSON/markdown. The pieces it calls each own their part; this module only wires them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eft_serve.demo.world import Question
from eft_serve.evaluation import conditions as cond
from eft_serve.evaluation import document, report, tables
from eft_serve.evaluation.runner import Answers, Decoding, run_conditions

Log = Callable[[str], None]
REGENERATE = "eft eval --sweeps --topk-table --out docs/results"


@dataclass
class EvalOptions:
    address: str | None = None  # None: start the full-family stack here
    prompts: int | None = None  # None: every held-out question
    out: Path = Path("docs/results")
    seed: int = 0
    sweeps: bool = False
    topk_table: bool = False
    threads: int = 4
    max_new_tokens: int = 40
    topk_tokens: int = 24  # positions per prompt of the in-process top-k measurement
    conservative_top_p: float = 0.9  # the coordinator's default; the in-process measure uses the same
    notes: list[str] = field(default_factory=list)


def select_questions(all_questions: Sequence[Question], n: int | None, seed: int) -> list[Question]:
    """All questions in order, or a seeded sample of `n` of them (kept in their original order)."""
    if n is None or n >= len(all_questions):
        return list(all_questions)
    picked = sorted(random.Random(f"eft-eval/{seed}").sample(range(len(all_questions)), max(0, n)))
    return [all_questions[i] for i in picked]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_stack_config(ray_temp_dir: str | None = None):
    """The full demo family (5 pools, every recipe) on a free gRPC port.

    Ray's CPU count is logical: every replica reserves CPUs (5 pools × 1 + coordinator), more than a
    small machine has, and they mostly wait on each other, so we declare enough to place them all.
    `ray_temp_dir`: a private Ray temp dir: this run's session (logs, sockets) stays apart from other
    Ray instances on the machine, and nothing there (`ray_current_cluster`) can point us at theirs.
    """
    from eft_serve.config import EftConfig, demo_config

    data = demo_config(full_family=True).model_dump()
    data["grpc"]["port"] = _free_port()
    data["ray"]["temp_dir"] = ray_temp_dir
    need = sum(p["replica"]["num_cpus"] for p in data["pools"].values()) + data["coordinator"]["replica"]["num_cpus"]
    data["ray"]["num_cpus"] = max(math.ceil(need) + 1, data["ray"]["num_cpus"] or 0)
    return EftConfig.model_validate(data)


@contextlib.contextmanager
def _service(opts: EvalOptions, log: Log) -> Iterator[str]:
    """Yields the address of a running service: the given one, or a stack we start and stop."""
    if opts.address:
        yield opts.address
        return
    from eft_serve.stack import local_stack

    # Short path under /tmp: Ray's Unix sockets live below it (AF_UNIX paths are ≤ 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="eft-eval-ray-", dir="/tmp")
    cfg = eval_stack_config(ray_temp_dir=temp_dir)
    with local_stack(cfg, http_port=_free_port(), log=lambda m: log(f"[eft] {m}")) as effective:
        yield f"127.0.0.1:{effective.grpc.port}"
    # Only after a clean run: on failure the Ray logs there are what explains it.
    shutil.rmtree(temp_dir, ignore_errors=True)


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Raise `StartupError` (one line naming the address and the cause) unless an EFT service
    answers `ListRecipes` at `address`."""
    import grpc

    from eft_serve.evaluation.backends import GrpcGenerator
    from eft_serve.preflight import StartupError

    try:
        with GrpcGenerator(address, timeout_s=timeout_s) as generate:
            generate.recipes()
    except grpc.RpcError as e:
        details = " ".join(str(e.details() or "").split())
        raise StartupError(f"server {address}: {e.code().name}: {details[:300]}") from e


def _conditions(opts: EvalOptions) -> list[cond.Condition]:
    conds = cond.headline_conditions()
    if opts.sweeps:
        conds += cond.beta_sweep() + cond.lambda_sweep()
    if opts.topk_table:
        conds += cond.topk_grid()
    return conds


def run_eval(opts: EvalOptions, log: Log = print) -> int:
    from eft_serve.demo.family import ensure_demo_family
    from eft_serve.evaluation.backends import GrpcGenerator

    started = time.perf_counter()
    if opts.address:  # one line (exit 2) before the demo family is built or found
        check_reachable(opts.address)
    family = ensure_demo_family(log=log)  # the served family (`demo:<role>` is seed 0)
    questions = select_questions(family.world.held_out_questions(), opts.prompts, opts.seed)
    wanted = _conditions(opts)
    decoding = Decoding(max_new_tokens=opts.max_new_tokens, seed=opts.seed)
    notes = list(opts.notes)
    with _service(opts, log) as address, GrpcGenerator(address) as generate:
        conds, skipped = cond.available(wanted, generate.recipes())
        for c in skipped:
            notes.append(f"skipped {c.name!r}: the server at {address} has no recipe {c.recipe!r}")
            log(f"skipping {c.name}: no recipe {c.recipe!r} on {address}")
        distinct = len({c.key() for c in conds})
        log(
            f"evaluating {len(questions)} held-out questions × {distinct} distinct settings over gRPC at {address} "
            f"({opts.threads} threads)"
        )
        answers = run_conditions(generate, questions, conds, decoding, threads=opts.threads, log=log)
    service_s = time.perf_counter() - started

    accuracy = []
    if opts.topk_table:
        from eft_serve.evaluation.topk_accuracy import measure_demo

        log(f"top-k vs exact, in-process: {len(questions)} prompts, up to {opts.topk_tokens} positions each")
        accuracy = measure_demo(
            family,
            [q.prompt for q in questions],
            ks=[k for k in cond.TOP_KS if k],
            max_tokens=opts.topk_tokens,
            conservative_top_p=opts.conservative_top_p,
            log=log,
        )
    meta = {
        "command": REGENERATE if opts.sweeps and opts.topk_table and opts.prompts is None else _command_line(opts),
        "prompts": len(questions),
        "seed": opts.seed,
        "stack": _stack_words(opts),
        "max_new_tokens": opts.max_new_tokens,
        "top_k": cond.DEFAULT_TOP_K,
        "threads": opts.threads,
        "conservative_top_p": opts.conservative_top_p,
        "requests": len({c.key() for c in conds}) * len(questions),
        "service_seconds": round(service_s, 1),
        "run_seconds": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": _machine(),
        "topk_positions": accuracy[0].positions if accuracy else 0,
        "notes": notes,
    }
    write_results(opts.out, questions, answers, accuracy, meta, log)
    return 0


def _machine() -> str:
    """The machine in a few words, for the results page: CPU cores and the GPU, if any."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores, {gpu}"


def _stack_words(opts: EvalOptions) -> str:
    if opts.address:
        return f"a running server at {opts.address}"
    return "full demo family, 5 pools + coordinator + local Redis, started by `eft eval` on a local Ray"


def _command_line(opts: EvalOptions) -> str:
    parts = ["eft eval"]
    if opts.address:
        parts.append(f"--address {opts.address}")
    if opts.prompts is not None:
        parts.append(f"--prompts {opts.prompts}")
    if opts.seed:
        parts.append(f"--seed {opts.seed}")
    if opts.sweeps:
        parts.append("--sweeps")
    if opts.topk_table:
        parts.append("--topk-table")
    parts.append(f"--out {opts.out}")
    return " ".join(parts)


def write_results(
    out: Path,
    questions: Sequence[Question],
    answers: Answers,
    accuracy: Sequence[Any],
    meta: dict[str, Any],
    log: Log = print,
) -> dict[str, Any]:
    """Score, print and write every table, figure and the results README; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    aggs = report.aggregates(questions, answers)
    headline = report.headline_rows(aggs)
    fig = report.figures(aggs)
    beta = report.beta_rows(aggs)
    lam_rows = report.lambda_rows(aggs)
    lam = report.lambda_check(lam_rows)
    topk = report.topk_rows(aggs, accuracy) if accuracy else []

    log(f"\nHeld-out evaluation through the service ({meta['prompts']} questions, greedy):\n")
    log(tables.console_table(headline, document.HEADLINE_COLUMNS))
    log("")
    for line in document.figures_lines(fig, lam):
        log(line.replace("**", ""))
    tables.write_csv(out / "headline.csv", headline)
    tables.write_csv(out / "headline_answers.csv", _answer_rows(questions, answers))
    if beta:
        log("\nβ sweep (upscale):\n" + tables.console_table(beta, document.BETA_COLUMNS))
        tables.write_csv(out / "beta_sweep.csv", beta)
        from eft_serve.evaluation.plots import plot_beta

        refs = {k: aggs[k].knowledge for k in ("large_ft", "small_ft") if k in aggs}
        plot_beta(beta, out / "beta_sweep.png", references=refs)
    if lam_rows:
        log("\nλ sweep (interpolate):\n" + tables.console_table(lam_rows, document.LAMBDA_COLUMNS))
        tables.write_csv(out / "lambda_sweep.csv", lam_rows)
        from eft_serve.evaluation.plots import plot_lambda

        plot_lambda(lam_rows, out / "lambda_sweep.png")
    if topk:
        log("\ntop-k × conservative:\n" + tables.console_table(topk, document.TOPK_COLUMNS))
        tables.write_csv(out / "topk_table.csv", topk)
    summary = {
        **meta,
        "figures": fig.as_dict() if fig else None,
        "lambda_check": lam.as_dict() if lam else None,
        "headline": headline,
    }
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, ensure_ascii=False) + "\n")
    (out / "README.md").write_text(document.results_readme(meta, headline, fig, beta, lam_rows, lam, topk))
    log(f"\nwrote {out}/ (README.md, CSV, PNG, summary.json) in {meta['run_seconds']:.0f}s")
    return summary


def _answer_rows(questions: Sequence[Question], answers: Answers) -> list[dict[str, Any]]:
    from eft_serve.evaluation.scoring import score_answer

    rows = []
    for recipe, _ in cond.HEADLINE:
        for q, text in zip(questions, answers.get(recipe, ())):
            s = score_answer(q, text)
            rows.append(
                {
                    "recipe": recipe,
                    "entity": q.entity,
                    "attribute": q.attribute,
                    "answer": q.answer,
                    "correct": int(s.correct),
                    "style": s.style,
                    "behaviour": s.behaviour_a,
                    "text": text,
                }
            )
    return rows


def _json_safe(o: Any) -> Any:
    """NaN (an undefined ratio) → null: JSON has no NaN."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o
