"""Helpers for tests and benchmarks; the service never imports this package.

`fake_engine` (``FakeEngine``, a deterministic stand-in model), `multinode_cluster` (a multi-node
Ray cluster on one machine, one worker node per pool), `loadgen` (bounded load against a
running stack, with a replica-count timeline), `replica_processes` (a pool's replica processes
on this host) and `grpc_coordinator` / `grpc_pool` (the client
API and pools over plain grpc.aio on loopback, without Ray). Shipped in the package so benchmarks and the
cluster tests can import them, but nothing under `eft_serve` outside this package depends on them.
"""
