"""KV-cache affinity for the model pools: every call of one sequence goes to the same replica.

Owns the routing decision for pool deployments (`pools.<role>.kv_affinity`, wired in by
`serve/app.py`). A pool replica keeps the KV cache of the prefixes it has seen, so a sequence whose
steps all land on one replica recomputes only its new tokens. The sequence id travels as the Serve
handle's `session_id` (`RequestMetadata.session_id`, set by `serve/pool_handle.py`); nothing here
parses protobuf.

Ranking (`rank_replicas`, pure): rendezvous (highest-random-weight) hashing of the sequence id over
the replica ids picks the preferred replica, so when a pool scales only the sequences of the replica
that left (or ~1/(n+1) of them, for the replica that joined) move. Rank 1 is the preferred replica;
rank 2 the others, least loaded first (ties in rendezvous order, so a sequence that overflows keeps
overflowing to the same place). Serve tries the ranks in order and skips a replica whose queue is
at `max_ongoing_requests`; a preferred replica already known to be full goes last. Calls without a
sequence id (`Info`) get one rank, least loaded first with random ties, like Serve's default router.

Does NOT know the pool protocol, the engine or the coordinator.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


@dataclass(frozen=True)
class ReplicaLoad:
    replica_id: str
    queue_len: int | None  # ongoing requests as last seen by this router; None = unknown
    capacity: int  # the replica's max_ongoing_requests

    @property
    def full(self) -> bool:
        return self.queue_len is not None and self.queue_len >= self.capacity

    @property
    def load(self) -> int:
        # Unknown counts as idle, as in Serve (an unknown replica is probed, not avoided).
        return self.queue_len or 0


def rendezvous_weight(replica_id: str, sequence_id: str) -> int:
    """A stable 64-bit weight of (replica, sequence); identical in every process (no `hash()` salt)."""
    data = f"{len(sequence_id)}:{sequence_id}|{replica_id}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def rendezvous_order(replica_ids: Sequence[str], sequence_id: str) -> list[str]:
    """Replica ids by descending rendezvous weight for `sequence_id`: the first is its home."""
    return sorted(replica_ids, key=lambda r: (rendezvous_weight(r, sequence_id), r), reverse=True)


def rank_replicas(
    replicas: Sequence[ReplicaLoad], sequence_id: str, rng: random.Random | None = None
) -> list[list[str]]:
    """Ranks of replica ids, most preferred first (Serve's `choose_replicas` contract, by id)."""
    if not replicas:
        return []
    by_id = {r.replica_id: r for r in replicas}
    if not sequence_id:
        draw = (rng or random).random
        return [sorted(by_id, key=lambda i: (by_id[i].load, draw()))]
    home, *rest = rendezvous_order(list(by_id), sequence_id)
    # Stable sort: equal loads keep rendezvous order.
    others = sorted(rest, key=lambda i: (by_id[i].full, by_id[i].load))
    ranks = [others, [home]] if by_id[home].full else [[home], others]
    return [rank for rank in ranks if rank]


class KvAffinityRouter(RequestRouter):
    """Serve request router for the pool deployments (see the module docstring).

    Deliberately without Serve's FIFOMixin: that mixin hands a replica chosen for one request to
    the oldest pending request, which would send a sequence to another sequence's replica.
    """

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        sequence_id = ""
        if pending_request is not None:
            sequence_id = pending_request.metadata.session_id
            # Every rank is returned at once: back off before trying them all again.
            pending_request.routing_context.should_backoff = True
        cache = self.replica_queue_len_cache
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [ReplicaLoad(i, cache.get(r.replica_id), r.max_ongoing_requests) for i, r in by_id.items()]
        return [[by_id[i] for i in rank] for rank in rank_replicas(loads, sequence_id)]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata: Any = None) -> None:
        # The base class finds the request being routed by `internal_request_id`, which a handle
        # call inherits from the request its caller is serving: two concurrent pool calls of one
        # coordinator request would share it, and the second would never be assigned. Match the
        # request's own metadata object instead (each `.remote()` call makes a new one).
        if request_metadata is None:
            return
        for pr in self._pending_requests_to_fulfill:
            if pr.metadata is request_metadata and not pr.future.done():
                self._cancel_routing_task_for_pending_request(pr)
                self._record_queue_wait_time(pr)
                pr.future.set_result(replica)
                if self._pending_requests_by_id.get(request_metadata.internal_request_id) is pr:
                    self._remove_pending_request_from_indices(pr)
                return
