"""Metrics and the access log of the running stack: scrape Ray's Prometheus endpoints and read the
coordinator replica's log after one successful and one failed request."""

from __future__ import annotations

import glob
import json
import os
import time
import urllib.request
import uuid
from collections.abc import Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eft_serve.client import EftClient
from eft_serve.serve.metrics import metrics_endpoints

pytestmark = pytest.mark.cluster

# Ray's metrics agent exports every metrics_report_interval_ms (10 s by default); allow a few.
WAIT_S = 60.0


def _scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(series name, labels) -> value, summed over nodes (the head runs the coordinator, workers
    the pools); only our (ray_eft_*) series."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for url in metrics_endpoints():
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("ray_eft_"):
                    key = (s.name, frozenset(s.labels.items()))
                    out[key] = out.get(key, 0.0) + s.value
    return out


def _total(series: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in series.items() if n == name and want <= lab)


def _wait_until(check: Callable[[dict], bool]) -> dict:
    deadline = time.monotonic() + WAIT_S
    while True:
        series = _scrape()
        if check(series) or time.monotonic() > deadline:
            return series
        time.sleep(1.0)


def test_requests_move_the_exported_series_and_write_access_lines(cluster_stack) -> None:
    assert metrics_endpoints(), "no node exports metrics"
    before = _scrape()
    request_id = f"metrics-{uuid.uuid4().hex[:8]}"
    q = cluster_stack["family"].world.held_out_questions()[0]
    with EftClient(cluster_stack["address"], timeout=120) as client:
        out = client.complete(q.prompt, temperature=0, max_new_tokens=6, ignore_eos=True, request_id=request_id)
        assert out.usage.completion_tokens == 6
        with pytest.raises(grpc.RpcError) as err:
            client.complete(q.prompt, recipe="no-such-recipe", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # `application` (added by Serve) is what the dashboard filters on.
    ok = dict(method="Generate", recipe="upscale", code="OK", application="eft")
    # An unknown recipe name is a client-chosen string: it is counted under "other".
    refused = dict(method="Generate", recipe="other", code="NOT_FOUND")
    wants = {
        ("ray_eft_requests_total", tuple(ok.items())): 1,
        ("ray_eft_requests_total", tuple(refused.items())): 1,
        ("ray_eft_time_to_first_token_seconds_count", (("recipe", "upscale"),)): 1,
        ("ray_eft_inter_token_latency_seconds_count", (("recipe", "upscale"),)): 5,
        ("ray_eft_generated_tokens_total", (("recipe", "upscale"),)): 6,
        ("ray_eft_request_latency_seconds_count", (("recipe", "upscale"),)): 1,
        ("ray_eft_pool_call_latency_seconds_count", (("role", "large_base"),)): 6,
        ("ray_eft_pool_calls_total", (("role", "small_ft"), ("code", "OK"))): 6,
        ("ray_eft_pool_queue_wait_seconds_count", (("role", "large_base"),)): 6,
        ("ray_eft_pool_wire_calls_total", (("role", "large_base"),)): 6,
    }

    def moved(series: dict) -> dict:
        return {
            (name, labels): _total(series, name, **dict(labels)) - _total(before, name, **dict(labels))
            for (name, labels) in wants
        }

    after = _wait_until(lambda s: all(d >= wants[k] for k, d in moved(s).items()))
    deltas = moved(after)
    assert all(d >= wants[k] for k, d in deltas.items()), {k: (d, wants[k]) for k, d in deltas.items()}
    # The request and key ids never become labels.
    assert not any(request_id in v for (_, labels) in after for _, v in labels)
    in_flight = [v for (n, _), v in after.items() if n == "ray_eft_requests_in_flight"]
    assert in_flight and sum(in_flight) == 0

    # The access log: one JSON line per request in the coordinator replica's Ray log files.
    temp_dir = cluster_stack["cluster"].temp_dir
    line = _access_line(temp_dir, request_id)
    assert line is not None, f"no access log line for {request_id} under {temp_dir}"
    assert (line["status"], line["recipe"], line["key_id"], line["completion_tokens"]) == ("OK", "upscale", "-", 6)
    assert line["ttft_ms"] > 0 and line["latency_ms"] >= line["ttft_ms"] and "prompt" not in line


def _access_line(temp_dir: str, request_id: str) -> dict | None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for path in glob.glob(os.path.join(temp_dir, "session_*", "logs", "**", "*"), recursive=True):
            if not os.path.isfile(path):
                continue
            with open(path, errors="replace") as f:
                for raw in f:
                    if request_id in raw and '"request_id"' in raw:
                        return json.loads(raw[raw.index("{") :])
        time.sleep(1.0)
    return None
