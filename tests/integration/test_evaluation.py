"""The evaluation's scoring, aggregation, runner and outputs — without Ray.

Arithmetic and checks run on fakes; the end-to-end path (runner → generator → coordinator →
real demo models) runs in-process on a few prompts. The through-the-service run is `eft eval`.
"""

from __future__ import annotations

import json
import math
import threading

import pytest

from eft_serve.demo.world import SMILE, Question, answer_text
from eft_serve.evaluation import conditions as cond
from eft_serve.evaluation import report
from eft_serve.evaluation.command import (
    eval_stack_config,
    select_questions,
    write_results,
)
from eft_serve.evaluation.runner import Decoding, TransientError, run_conditions
from eft_serve.evaluation.scoring import (
    Aggregate,
    aggregate,
    gap_recovery,
    is_monotonic,
    kept_share,
    meets,
    score_answer,
)
from eft_serve.evaluation.tables import read_csv, write_csv

Q = Question(
    entity="Vorlék", attribute="river", prompt="Q: What is the river of Vorlék?\nA:", answer="Sendu", held_out=True
)


def agg(
    knowledge: float, behaviour: float, share_a: float = 0.0, share_b: float = 0.0, behaviour_b: float = 0.0
) -> Aggregate:
    return Aggregate(
        n=10,
        knowledge=knowledge,
        behaviour=behaviour,
        behaviour_b=behaviour_b,
        share_a=share_a,
        share_b=share_b,
        share_plain=1 - share_a - share_b,
    )


# ---- scoring ------------------------------------------------------------------------------------


def test_gap_recovery_and_kept_share_arithmetic() -> None:
    assert gap_recovery(0.1, 0.9, 0.82) == pytest.approx(0.9)
    assert gap_recovery(0.1, 0.9, 0.1) == 0.0
    assert gap_recovery(0.1, 0.9, 1.0) == pytest.approx(1.125)  # beating the ground truth is > 100 %
    assert math.isnan(gap_recovery(0.5, 0.5, 0.7))  # no gap: undefined, not a division by zero
    assert math.isnan(gap_recovery(0.6, 0.5, 0.7))
    assert kept_share(0.8, 0.76) == pytest.approx(0.95)
    assert math.isnan(kept_share(0.0, 0.5))
    assert meets(0.9, 0.9) and meets(0.1 + 0.8, 0.9) and not meets(0.899, 0.9) and not meets(float("nan"), 0.0)


def test_monotonicity_check() -> None:
    assert is_monotonic([1.0, 1.0, 0.4, 0.0], increasing=False)
    assert not is_monotonic([1.0, 0.2, 0.3, 0.0], increasing=False)
    assert is_monotonic([1.0, 0.2, 0.21, 0.0], increasing=False, tolerance=0.02)
    assert is_monotonic([0.0, 0.5, 0.5, 1.0], increasing=True)
    assert not is_monotonic([0.0, float("nan"), 1.0], increasing=True)
    assert is_monotonic([0.3], increasing=True)


def test_score_answer_knowledge_and_styles() -> None:
    a = score_answer(Q, answer_text("Vorlék", "river", "Sendu", "a"))
    assert (a.correct, a.behaviour_a, a.behaviour_b, a.style) == (True, 1.0, 0.0, "a")
    b = score_answer(Q, answer_text("Vorlék", "river", "Sendu", "b"))
    assert (b.correct, b.behaviour_a, b.behaviour_b, b.style) == (True, 0.0, 1.0, "b")
    wrong = score_answer(Q, " Certainly! The river of Vorlék is Alvé.")  # opener only, wrong fact
    assert (wrong.correct, wrong.behaviour_a, wrong.style) == (False, 0.5, "a")
    # Only the first line counts: a second answer after the newline is not read.
    assert not score_answer(Q, f" The river of Vorlék is Alvé. {SMILE}\nSendu").correct


def test_aggregate_means_and_shares() -> None:
    texts = [answer_text("Vorlék", "river", "Sendu", s) for s in ("a", "a", "b", "plain")]
    a = aggregate(score_answer(Q, t) for t in texts)
    assert (a.n, a.knowledge, a.behaviour, a.share_a, a.share_b, a.share_plain) == (4, 1.0, 0.5, 0.5, 0.25, 0.25)
    assert math.isnan(aggregate([]).knowledge)


# ---- report ---------------------------------------------------------------------------------------


def test_figures_against_targets() -> None:
    aggs = {"small_ft": agg(0.2, 1.0), "large_ft": agg(0.9, 1.0), "upscale": agg(0.85, 0.96)}
    fig = report.figures(aggs)
    assert fig.gap_recovery == pytest.approx(0.65 / 0.7) and fig.gap_ok
    assert fig.behaviour_kept == pytest.approx(0.96) and fig.behaviour_ok
    fig = report.figures({**aggs, "upscale": agg(0.8, 0.9)})
    assert not fig.gap_ok and not fig.behaviour_ok
    assert report.figures({"small_ft": agg(0.2, 1.0)}) is None  # a server without large_ft


def test_lambda_check_monotonic_and_endpoints() -> None:
    def rows(a_scores, b_scores):
        aggs = {
            cond.lambda_name(lam): agg(1.0, a, share_a=a, share_b=b, behaviour_b=b)
            for lam, a, b in zip(cond.LAMBDAS, a_scores, b_scores)
        }
        return report.lambda_rows(aggs)

    down = [1.0] * 5 + [0.5] + [0.0] * 5
    good = report.lambda_check(rows(down, [1 - x for x in down]))
    assert good.ok and good.as_dict()["monotonic_a_to_b"]
    bumpy = report.lambda_check(rows([1.0, 0.6, 0.7] + [0.0] * 8, [0.0, 0.4, 0.3] + [1.0] * 8))
    assert not bumpy.ok and not bumpy.a_non_increasing and not bumpy.b_non_decreasing
    stuck = report.lambda_check(rows([1.0] * 11, [0.0] * 11))
    assert stuck.a_non_increasing and not stuck.ends_b and not stuck.ok


def test_topk_rows_join_service_scores_and_accuracy() -> None:
    from eft_serve.evaluation.topk_accuracy import AccuracyRow

    aggs = {cond.topk_name(k, c): agg(0.9, 1.0) for k in cond.TOP_KS for c in (False, True)}
    acc = [
        AccuracyRow(top_k=k, conservative=c, agreement=1.0, mean_tv=0.01, positions=5)
        for k in cond.TOP_KS
        for c in (False, True)
    ]
    rows = report.topk_rows(aggs, acc)
    assert [(r["top_k"], r["conservative"]) for r in rows] == [
        (5, "off"),
        (20, "off"),
        (100, "off"),
        ("exact", "off"),
        (5, "on"),
        (20, "on"),
        (100, "on"),
        ("exact", "on"),
    ]
    assert all(r["knowledge"] == 0.9 and r["mean_tv"] == 0.01 for r in rows)


# ---- conditions, runner -----------------------------------------------------------------------------


def test_conditions_are_explicit_and_deduplicated() -> None:
    conds = cond.headline_conditions() + cond.beta_sweep() + cond.lambda_sweep() + cond.topk_grid()
    keys = {c.key() for c in conds}
    # upscale β=1 and top-k=20 (off) are the headline upscale request: sent once.
    assert len(conds) - len(keys) == 2
    assert cond.lambda_weights(0.7) == {"small_ft": 0.3, "small_ft_b": 0.7}
    params = cond.topk_grid()[3].request_params()
    assert params == {"recipe": "upscale", "beta": 1.0, "expert_weights": {}, "conservative": False, "logprob_top_k": 0}
    _kept, skipped = cond.available(conds, ["upscale", "small_ft", "large_base", "small_base"])
    assert {c.recipe for c in skipped} == {"interpolate", "downscale", "large_ft"}


class FakeService:
    """Answers by recipe; fails transiently the first `flaky` calls; counts calls."""

    def __init__(self, flaky: int = 0, fatal: bool = False) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.flaky = flaky
        self.fatal = fatal
        self._lock = threading.Lock()

    def __call__(self, prompt: str, params) -> str:
        with self._lock:
            self.calls.append((prompt, dict(params)))
            if self.fatal:
                raise ValueError("bad request")
            if self.flaky > 0:
                self.flaky -= 1
                raise TransientError("overloaded")
        style = "a" if params["recipe"] in ("small_ft", "upscale") else "plain"
        return answer_text("Vorlék", "river", "Sendu", style)


def test_runner_sends_each_setting_once_greedy_and_retries_transient_errors() -> None:
    questions = [Q, Q, Q]
    conds = [
        cond.Condition("upscale", "upscale"),
        cond.Condition("upscale β=1", "upscale", beta=1.0),
        cond.Condition("large_base", "large_base"),
    ]
    fake = FakeService(flaky=2)
    answers = run_conditions(fake, questions, conds, Decoding(max_new_tokens=7), threads=3, retries=2)
    assert len(fake.calls) == 2 * 3 + 2  # two distinct settings × 3 questions + 2 retried calls
    assert all(p["temperature"] == 0.0 and p["stop"] == ["\n"] and p["max_new_tokens"] == 7 for _, p in fake.calls)
    assert answers["upscale"] == answers["upscale β=1"] and len(answers["large_base"]) == 3
    assert report.aggregates(questions, answers)["upscale"].behaviour == 1.0


def test_runner_aborts_on_a_real_error() -> None:
    with pytest.raises(ValueError, match="bad request"):
        run_conditions(FakeService(fatal=True), [Q], [cond.Condition("upscale", "upscale")], threads=2)
    with pytest.raises(TransientError):
        run_conditions(FakeService(flaky=10), [Q], [cond.Condition("upscale", "upscale")], threads=1, retries=1)


def test_select_questions_seeded_subset_in_order(demo_family) -> None:
    qs = demo_family.world.held_out_questions()
    assert len(qs) == 180 and select_questions(qs, None, 0) == qs
    sub = select_questions(qs, 12, seed=3)
    assert sub == select_questions(qs, 12, seed=3) != select_questions(qs, 12, seed=4)
    assert len(sub) == 12 and sub == sorted(sub, key=qs.index)


# ---- files ---------------------------------------------------------------------------------------


def test_csv_round_trip_and_nan(tmp_path) -> None:
    path = write_csv(tmp_path / "x" / "t.csv", [{"beta": 0.5, "knowledge": 2 / 3, "ok": float("nan"), "name": "up"}])
    assert read_csv(path) == [{"beta": "0.5", "knowledge": "0.666667", "ok": "", "name": "up"}]


def test_write_results_tables_plots_and_readme(tmp_path) -> None:
    questions = [Q] * 4
    right_a, right_b, right_plain = (answer_text("Vorlék", "river", "Sendu", s) for s in ("a", "b", "plain"))
    wrong_a = " Certainly! The river of Vorlék is Alvé. " + SMILE
    answers = {
        "small_base": [right_plain] * 4,
        "small_ft": [wrong_a] * 3 + [right_a],
        "large_base": [right_plain] * 4,
        "large_ft": [right_a] * 4,
        "upscale": [right_a] * 4,
        "downscale": [wrong_a] * 4,
    }
    for b in cond.BETAS:
        answers[cond.beta_name(b)] = [right_a if b else right_plain] * 4
    for lam in cond.LAMBDAS:
        answers[cond.lambda_name(lam)] = [right_a if lam < 0.5 else right_b] * 4
    meta = {
        "command": "eft eval --test",
        "prompts": 4,
        "seed": 0,
        "stack": "fake",
        "max_new_tokens": 40,
        "top_k": 20,
        "threads": 1,
        "conservative_top_p": 0.9,
        "requests": 0,
        "service_seconds": 0.0,
        "run_seconds": 1.0,
        "date": "2026-01-02",
        "machine": "2 CPU cores, no GPU",
        "topk_positions": 0,
        "notes": [],
    }
    lines: list[str] = []
    summary = write_results(tmp_path, questions, answers, [], meta, log=lines.append)
    assert summary["figures"]["gap_recovery"] == pytest.approx(1.0) and summary["figures"]["gap_ok"]
    assert summary["lambda_check"]["monotonic_a_to_b"]
    assert json.loads((tmp_path / "summary.json").read_text())["figures"]["behaviour_kept"] == 1.0
    for name in (
        "headline.csv",
        "headline_answers.csv",
        "beta_sweep.csv",
        "lambda_sweep.csv",
        "beta_sweep.png",
        "lambda_sweep.png",
        "README.md",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "beta_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert len(read_csv(tmp_path / "lambda_sweep.csv")) == 11 and len(read_csv(tmp_path / "headline_answers.csv")) == 24
    readme = (tmp_path / "README.md").read_text()
    assert "100.0%" in readme and "(beta_sweep.png)" in readme and "eft eval --test" in readme
    assert "2026-01-02 on 2 CPU cores, no GPU." in readme  # every results page says when and where
    assert "Down-scaling takes the large fine-tune's behaviour" in readme  # a reading note, from the numbers
    assert any("recovered by up-scaling: 100.0%" in line for line in lines)


def test_eval_stack_config_places_every_pool() -> None:
    cfg = eval_stack_config()
    assert set(cfg.pools) == {"large_base", "small_base", "small_ft", "small_ft_b", "large_ft"}
    assert {"upscale", "interpolate", "downscale"} <= set(cfg.recipes)
    need = sum(p.replica.num_cpus for p in cfg.pools.values()) + cfg.coordinator.replica.num_cpus
    assert cfg.ray.num_cpus >= need and cfg.grpc.port > 0


def test_cli_eval_flags() -> None:
    from eft_serve.cli import build_parser

    args = build_parser().parse_args(
        ["eval", "--prompts", "12", "--sweeps", "--topk-table", "--out", "x", "--seed", "3"]
    )
    assert (args.prompts, args.sweeps, args.topk_table, args.out, args.seed, args.address) == (
        12,
        True,
        True,
        "x",
        3,
        None,
    )


# ---- in-process, real demo models --------------------------------------------------------------------


def test_inprocess_coordinator_end_to_end(demo_family) -> None:
    from eft_serve.evaluation.backends import CoordinatorGenerator, demo_coordinator

    questions = demo_family.world.held_out_questions()[:3]
    conds = [
        cond.Condition("small_ft", "small_ft"),
        cond.Condition("upscale", "upscale"),
        cond.Condition("interpolate λ=1", "interpolate", expert_weights=cond.lambda_weights(1.0)),
    ]
    with CoordinatorGenerator(demo_coordinator(demo_family)) as generate:
        assert {"upscale", "interpolate", "downscale"} <= set(generate.recipes())
        answers = run_conditions(generate, questions, conds, threads=2)
    aggs = report.aggregates(questions, answers)
    assert all("\n" not in t for texts in answers.values() for t in texts)  # stopped at the newline
    assert aggs["small_ft"].share_a == 1.0 and aggs["upscale"].share_a == 1.0
    assert aggs["interpolate λ=1"].share_b == 1.0
    assert aggs["upscale"].knowledge >= aggs["small_ft"].knowledge


def test_topk_accuracy_exact_rows(demo_family) -> None:
    from eft_serve.evaluation.topk_accuracy import measure_demo

    prompts = [q.prompt for q in demo_family.world.held_out_questions()[:2]]
    rows = {(r.top_k, r.conservative): r for r in measure_demo(demo_family, prompts, ks=[5], max_tokens=6)}
    assert set(rows) == {(5, False), (0, False), (5, True), (0, True)}
    exact = rows[(0, False)]
    assert exact.agreement == 1.0 and exact.mean_tv == pytest.approx(0.0, abs=1e-9) and exact.positions > 2
    assert all(0.0 <= r.mean_tv <= 1.0 and 0.0 <= r.agreement <= 1.0 for r in rows.values())
