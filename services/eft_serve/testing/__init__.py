"""Helpers for tests and benchmarks; the service never imports this package.

`fake_engine` (``FakeEngine``, a deterministic stand-in model), `multinode_cluster` (a multi-node
Ray cluster on one machine, one worker node per pool) and `loadgen` (bounded load against a
running stack, with a replica-count timeline). Shipped in the package so benchmarks and the
cluster tests can import them, but nothing under `eft_serve` outside this package depends on them.
"""
