"""`eft plan`: the sizing arithmetic of docs/sizing.md, checked against hand-computed figures."""

from __future__ import annotations

import math

import pytest

from eft_serve.cli import main
from eft_serve.planning import GPUS, PAPER_SETUP, Assumptions, PoolSpec, Workload, parse_pool, plan, step_cost

A100 = GPUS["a100-80gb"]
WORK = Workload(rate_rps=2.0, prompt_tokens=512, output_tokens=256, itl_ms=100.0)


def test_roofline_step_cost_of_the_70b_at_tp4() -> None:
    fixed, per_seq = step_cost(PAPER_SETUP[0], A100, context=640, a=Assumptions())
    # 68.98e9 params × 2 bytes over 4 GPUs at 70 % of 2.04 TB/s each.
    assert fixed == pytest.approx(68.98e9 * 2 / (4 * 2.04e12 * 0.7) * 1e3)
    kv = 320 * 1024 * 640 / (4 * 2.04e12 * 0.7)
    matmul = 2 * 68.98e9 / (4 * 312e12 * 0.4)
    assert per_seq == pytest.approx((kv + matmul) * 1e3)


def test_paper_setup_plan_shows_its_arithmetic() -> None:
    p = plan(WORK, PAPER_SETUP, A100)
    assert p.streams == pytest.approx(2.0 * 256 * 0.1)
    large, small_base, small_ft = p.pools
    assert (large.batch, large.limited_by) == (64, "max batch")
    # 51.2 streams / 64 + 1024 prompt tokens/s over the replica's prefill rate.
    prefill_tps = 4 * 312e12 * 0.4 / (2 * 68.98e9)
    assert large.replicas == math.ceil(51.2 / 64 + 1024 / prefill_tps) == 2 and large.gpus == 8
    assert small_base.replicas == small_ft.replicas == 1 and p.gpus == 10
    # 512 tokens/s × 5 ms CPU = 2.56 CPUs at 60 % of one CPU a replica.
    assert p.coordinator_replicas == math.ceil(512 * 5e-3 / 0.6) == 5
    assert p.itl_ms <= WORK.itl_ms
    assert "51.2 / 64 + 1024 / 3618" in large.lines[1]


def test_a_tight_latency_target_shrinks_the_batch_and_adds_replicas() -> None:
    loose = plan(WORK, PAPER_SETUP, A100)
    tight_work = Workload(2.0, 512, 256, itl_ms=35.0)
    tight = plan(tight_work, PAPER_SETUP, A100)
    large = tight.pools[0]
    assert large.limited_by == "latency" and large.batch < 64
    assert large.fixed_ms + large.batch * large.per_seq_ms <= 35.0 - 5.0
    assert large.fixed_ms + (large.batch + 1) * large.per_seq_ms > 35.0 - 5.0
    assert tight.pools[0].replicas >= loose.pools[0].replicas


def test_kv_memory_caps_the_batch_of_long_contexts() -> None:
    long = plan(Workload(1.0, 3584, 512, itl_ms=200.0), PAPER_SETUP, A100)
    small = long.pools[1]
    room = 80e9 * 0.9 - 6.74e9 * 2
    assert small.limited_by == "KV memory" and small.batch == math.floor(room / (512 * 1024 * 4096))


def test_measured_step_costs_and_new_pools_override_the_roofline() -> None:
    pools = parse_pool("large_base:step_ms=30+0.5,max_batch=32", PAPER_SETUP)
    pools = parse_pool("small_ft_b:params_b=6.74,kv_kib_per_token=512", pools)
    assert [p.role for p in pools] == ["large_base", "small_base", "small_ft", "small_ft_b"]
    p = plan(WORK, pools, A100)
    assert (p.pools[0].fixed_ms, p.pools[0].per_seq_ms, p.pools[0].batch) == (30.0, 0.5, 32)
    assert p.pools[0].replicas == math.ceil(51.2 / 32 + p.pools[0].prefill_replicas)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("large_base:tp", "not key=value"),
        ("large_base:step_ms=30", r"FIXED\+PER_SEQ"),
        ("large_base:color=red", "unknown key"),
        ("new_pool:tp=2", "needs params_b"),
    ],
)
def test_bad_pool_specs_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pool(text, PAPER_SETUP)


def test_an_impossible_target_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="raise the ITL target or the pool's tensor parallelism"):
        plan(Workload(1.0, 512, 256, itl_ms=20.0), (PoolSpec("big", params_b=68.98, tp=1),), A100)


def test_eft_plan_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--rate", "2", "--itl-ms", "100"]) == 0
    out = capsys.readouterr().out
    assert "total GPUs: 10" in out and "large_base" in out and "streams in flight" in out
    assert main(["plan", "--itl-ms", "4"]) == 2
    assert "must exceed the per-token overhead" in capsys.readouterr().err
