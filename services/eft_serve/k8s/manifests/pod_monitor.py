"""A PodMonitor (Prometheus operator, monitoring.coreos.com/v1) scraping Ray's metrics port on
every Ray pod of the release: Serve's and our `eft_*` metrics (the Grafana dashboard
`k8s/grafana/eft-serve.json` reads them).

Owns: `pod_monitor`. Does NOT know: the NetworkPolicy that admits the monitoring namespace to
the port (`network_policies`), nor Prometheus itself (its `podMonitorSelector` must match
`monitoring.labels`).
"""

from __future__ import annotations

from typing import Any

from eft_serve.k8s.labels import object_meta, ray_pod_selector
from eft_serve.k8s.settings import StackSettings


def pod_monitor(s: StackSettings) -> dict[str, Any]:
    meta = object_meta(s, f"{s.release}-ray", "monitoring")
    meta["labels"] = {**meta["labels"], **s.monitoring.labels}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": meta,
        "spec": {
            "selector": ray_pod_selector(s),
            # The container port named "metrics" (Ray's metrics export port, 8080).
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": s.monitoring.interval}],
        },
    }
