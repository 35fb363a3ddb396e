"""A multi-node Ray cluster on one machine, one worker node per model pool, for tests and benchmarks.

Owns starting a head (127.0.0.2, resource `eft_head`) and one worker node per pool
(127.0.0.3, 127.0.0.4, …, each offering only `pool_<role>`), killing a worker node's raylet by
PID (failure tests), bringing a node back, and reporting where each Serve replica runs. Every
process is started and stopped through `ray.cluster_utils.Cluster` or by PID — never `ray stop`.

Does NOT know how the stack is deployed onto the cluster (`eft_serve.serve`); the service never
imports this module.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from typing import Any

from eft_serve.config import EftConfig
from eft_serve.infra.ports import free_port

HEAD_RESOURCE = "eft_head"


def pool_resource(role: str) -> str:
    return f"pool_{role}"


def with_node_groups(cfg: EftConfig) -> EftConfig:
    """Pin each pool to its node group's resource and the coordinator to the head group."""
    data = cfg.model_dump()
    for role, pool in data["pools"].items():
        pool["replica"]["node_group_resource"] = pool_resource(role)
    data["coordinator"]["replica"]["node_group_resource"] = HEAD_RESOURCE
    return EftConfig.model_validate(data)


class LocalMultiNodeCluster:
    def __init__(self, roles: list[str], head_ip: str = "127.0.0.2", cpus_per_node: int = 4) -> None:
        self.roles = list(roles)
        self.head_ip = head_ip
        self.cpus = cpus_per_node
        self.cluster: Any = None
        self.nodes: dict[str, Any] = {}
        self.node_ips: dict[str, str] = {}
        self.temp_dir: str | None = None

    def start(self) -> LocalMultiNodeCluster:
        from ray.cluster_utils import Cluster  # Ray is imported only by what needs a cluster

        # Our own session directory and GCS port: another Ray on this machine (a user's, a second
        # test run) must not share /tmp/ray's session files or port 6379 with this cluster.
        self.temp_dir = tempfile.mkdtemp(prefix="eftray-", dir="/tmp")
        # Ray's Cluster still records the head's address in <default temp dir>/ray_current_cluster
        # and fails on a fresh machine where that folder was never created (no Ray has run yet).
        from ray._common.utils import get_default_ray_temp_dir

        os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "node_ip_address": self.head_ip,
                "num_cpus": self.cpus,
                "resources": {HEAD_RESOURCE: 1000},
                "include_dashboard": False,
                "temp_dir": self.temp_dir,
                "gcs_server_port": free_port(self.head_ip),
            },
        )
        prefix = self.head_ip.rsplit(".", 1)[0]
        base = int(self.head_ip.rsplit(".", 1)[1])
        for i, role in enumerate(self.roles, start=1):
            self.node_ips[role] = f"{prefix}.{base + i}"
            self._add(role)
        return self

    def _add(self, role: str) -> None:
        self.nodes[role] = self.cluster.add_node(
            node_ip_address=self.node_ips[role],
            num_cpus=self.cpus,
            resources={pool_resource(role): 1000},
            temp_dir=self.temp_dir,
        )

    @property
    def address(self) -> str:
        return self.cluster.address

    def raylet_pid(self, role: str) -> int:
        return self.nodes[role].all_processes["raylet"][0].process.pid

    def kill_node(self, role: str) -> int:
        """SIGKILL the raylet of `role`'s node (its workers die with it); returns the PID."""
        pid = self.raylet_pid(role)
        os.kill(pid, signal.SIGKILL)
        return pid

    def restore_node(self, role: str) -> None:
        """Clean up what is left of a killed node and start a fresh one with the same address and resource."""
        old = self.nodes.pop(role)
        try:
            self.cluster.remove_node(old, allow_graceful=False)
        except Exception:  # noqa: BLE001 - the node is already dead; leftovers were ours and are gone
            pass
        self._add(role)

    def shutdown(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def replica_ips(app_name: str) -> list[str]:
    """Node IPs of the live replicas of every deployment of `app_name` (GCS actor table)."""
    import ray

    out = []
    for actor in ray._private.state.actors().values():
        name = actor.get("ActorClassName", "")
        if actor.get("State") == "ALIVE" and name.startswith(f"ServeReplica:{app_name}:"):
            out.append(actor["Address"]["IPAddress"])
    return sorted(out)


def running_replicas(app_name: str, deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        return 0
    return int(app.deployments[deployment].replica_states.get("RUNNING", 0))


def autoscaling_demo_config(cfg: EftConfig, large_max_replicas: int = 3) -> EftConfig:
    """The demo stack pinned to node groups, with fast autoscaling for demonstrations and tests:
    the large base scales 1..N at one ongoing request per replica; the small pools autoscale too,
    but with a target (32 ongoing) that ordinary load never reaches, so they stay at one replica."""
    data = with_node_groups(cfg).model_dump()
    fast = dict(upscale_delay_s=1.0, downscale_delay_s=6.0, metrics_interval_s=0.5, look_back_period_s=2.0)
    data["pools"]["large_base"]["replica"].update(
        max_ongoing_requests=4,
        autoscaling=dict(min_replicas=1, max_replicas=large_max_replicas, target_ongoing_requests=1.0, **fast),
    )
    for role in data["pools"]:
        if role != "large_base":
            data["pools"][role]["replica"].update(
                max_ongoing_requests=64,
                autoscaling=dict(min_replicas=1, max_replicas=2, target_ongoing_requests=32.0, **fast),
            )
    return EftConfig.model_validate(data)
