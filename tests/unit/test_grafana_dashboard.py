"""The Grafana dashboard (k8s/grafana/eft-serve.json) queries only metrics we export, under the
names Ray's exporter gives them (`ray_` + our name; histograms as _bucket/_sum/_count), and shows
every metric the README promises a panel for."""

from __future__ import annotations

import json
import re
from pathlib import Path

from eft_serve.serve.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "eft-serve.json"
_NAME = re.compile(r"\b(ray_[a-z_]+)\b")


def _exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in doc["panels"] for t in panel.get("targets", [])]


def _exported(name: str) -> tuple[str, str]:
    """(our metric name, the series suffix) of an exported series name, or raise."""
    assert name.startswith("ray_"), name
    base = name.removeprefix("ray_")
    if base in METRICS:
        return base, ""
    for suffix in ("_bucket", "_sum", "_count"):
        if base.endswith(suffix) and base.removesuffix(suffix) in METRICS:
            return base.removesuffix(suffix), suffix
    raise AssertionError(f"the dashboard queries {name!r}, which eft_serve.serve.metrics does not define")


def test_every_series_in_the_dashboard_is_one_we_export() -> None:
    exprs = _exprs()
    assert exprs
    for expr in exprs:
        names = _NAME.findall(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            base, suffix = _exported(name)
            kind = METRICS[base][0]
            # A histogram is only read through its series; counters and gauges only bare.
            assert (kind == "histogram") == (suffix != ""), (name, kind)
            if kind == "histogram":
                assert suffix == "_bucket" and expr.startswith("histogram_quantile("), expr
            if kind == "counter":
                assert f"rate({name}" in expr, f"a counter is read as a rate: {expr}"


def test_the_dashboard_covers_the_service_signals() -> None:
    used = {_exported(n)[0] for expr in _exprs() for n in _NAME.findall(expr)}
    wanted = {
        "eft_requests_total",
        "eft_time_to_first_token_seconds",
        "eft_inter_token_latency_seconds",
        "eft_generated_tokens_total",
        "eft_pool_call_latency_seconds",
        "eft_pool_retries_total",
        "eft_pool_queue_wait_seconds",
        "eft_cache_hits_total",
        "eft_cache_misses_total",
        "eft_speculative_accepted_tokens_total",
        "eft_speculative_drafted_tokens_total",
        "eft_requests_in_flight",
    }
    assert wanted <= used, wanted - used
