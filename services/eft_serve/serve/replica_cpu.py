"""A replica's CPU settings, applied at the start of its constructor (before an engine loads, so
torch's threads inherit them): `replica.cpu_affinity` pins, `replica.cpu_scheduling` sets the
Linux policy. Owns only that order and the log line; the mechanisms live in `eft_serve.infra`."""

from __future__ import annotations

import logging

from eft_serve.config import ReplicaConfig
from eft_serve.infra.cpu_affinity import pin_process_to_cpus
from eft_serve.infra.cpu_scheduling import use_scheduling_policy

log = logging.getLogger("eft_serve")


def apply_replica_cpu_settings(replica: ReplicaConfig, name: str) -> None:
    if replica.cpu_affinity is not None:
        pin_process_to_cpus(replica.cpu_affinity)
    policy = replica.cpu_scheduling
    if policy != "normal" and not use_scheduling_policy(policy):
        log.warning("%s: cpu_scheduling %r needs Linux; left at the OS default", name, policy)
