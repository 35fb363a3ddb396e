"""Quotas hold across coordinator replicas: a second coordinator application (`eft-quota`: auth on,
2 replicas, quotas in the session's Redis) over the session stack's pools, reached through the
same Serve gRPC proxy (`application` metadata).

Which replica served each call is read from the replicas' access logs (one JSON line per call,
in each replica process's own Ray log file): both replicas take calls, yet a key limited to N
streams gets exactly N at once in all, and a token bucket is spent once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest
import redis

from eft_serve.auth.keys import add_key
from eft_serve.config import EftConfig
from eft_serve.proto_gen.eft.v1 import eft_pb2, eft_pb2_grpc

APP = "eft-quota"
STREAMS = 2  # the stream-limited key's max_concurrent_streams
TPM = 30  # the metered key's tokens_per_minute
TOKENS = 20  # per metered call (ignore_eos: always all of them)


@pytest.fixture(scope="module")
def quota_app(cluster_stack, tmp_path_factory):
    from ray import serve

    from eft_serve.serve.app import coordinator_app
    from eft_serve.serve.local import wait_for_apps

    keys_file = tmp_path_factory.mktemp("quota") / "keys.yaml"
    keys = {
        "streams": add_key(keys_file, "streams", max_concurrent_streams=STREAMS),
        "metered": add_key(keys_file, "metered", max_concurrent_streams=None, tokens_per_minute=TPM),
    }
    base: EftConfig = cluster_stack["config"]
    data = base.model_dump(mode="json")
    data["auth"] = {"enabled": True, "keys_file": str(keys_file), "quota_store": "redis"}
    data["coordinator"]["replica"].update(num_replicas=2, autoscaling=None)
    data["coordinator"]["access_log"] = {"enabled": True, "include_prompt": False}
    cfg = EftConfig.model_validate(data)
    assert cfg.cache.url, "the session stack's Redis"
    serve.run(coordinator_app({"config": cfg.model_dump(mode="json")}), name=APP, route_prefix="/quota")
    wait_for_apps([APP], timeout_s=180)
    try:
        yield {"address": cluster_stack["address"], "keys": keys, "cfg": cfg, "cluster": cluster_stack["cluster"]}
    finally:
        serve.delete(APP)


def _metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"), ("application", APP))


def _request(rid: str, max_new_tokens: int) -> eft_pb2.GenerateRequest:
    return eft_pb2.GenerateRequest(
        prompt="Q: what is the capital of France?\nA:",
        request_id=rid,
        sampling=eft_pb2.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True),
    )


def _served_by(cluster, request_ids: set[str]) -> dict[str, tuple[str, dict]]:
    """request id -> (the replica process's log file, its access-log entry)."""
    found: dict[str, tuple[str, dict]] = {}
    for path in Path(cluster.temp_dir).rglob("worker-*.err"):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("request_id") in request_ids:
                found[entry["request_id"]] = (path.name, entry)
    return found


async def _await_logged(cluster, rids: set[str]) -> dict[str, tuple[str, dict]]:
    for _ in range(100):  # the lines reach the files a moment after the calls end
        found = _served_by(cluster, rids)
        if set(found) == rids:
            return found
        await asyncio.sleep(0.1)
    return found


async def _wave(quota_app, attempts: int) -> Counter:
    """`attempts` concurrent streams under one key limited to STREAMS: exactly STREAMS are admitted
    in all (each still open when the last refusal came); returns how many each replica took."""
    rids = [f"q-streams-{uuid.uuid4().hex[:8]}-{i}" for i in range(attempts)]
    async with grpc.aio.insecure_channel(quota_app["address"]) as channel:
        stub = eft_pb2_grpc.EftServiceStub(channel)
        calls = [
            stub.Generate(_request(rid, 128), metadata=_metadata(quota_app["keys"]["streams"]), timeout=120)
            for rid in rids
        ]

        async def first(call):
            try:
                await call.read()
                return "open"
            except grpc.aio.AioRpcError as e:
                return e.code()

        outcomes = await asyncio.gather(*(first(c) for c in calls))
        decided_at = asyncio.get_running_loop().time()
        admitted = [c for c, o in zip(calls, outcomes, strict=True) if o == "open"]
        assert all(o in ("open", grpc.StatusCode.RESOURCE_EXHAUSTED) for o in outcomes), outcomes
        # Every admitted stream is still open now: the limit was on streams open at the same time.
        ends = []
        for c in admitted:
            while await c.read() is not grpc.aio.EOF:  # read() only: gRPC forbids mixing it with iteration
                pass
            ends.append(asyncio.get_running_loop().time())
            assert await c.code() == grpc.StatusCode.OK
        assert min(ends) > decided_at
    assert len(admitted) == STREAMS, outcomes  # not STREAMS per replica

    found = await _await_logged(quota_app["cluster"], set(rids))
    assert set(found) == set(rids), f"access log lines missing for {set(rids) - set(found)}"
    statuses = Counter(entry["status"] for _, entry in found.values())
    assert statuses == {"OK": STREAMS, "RESOURCE_EXHAUSTED": attempts - STREAMS}, statuses
    return Counter(name for name, _ in found.values())


async def test_a_key_gets_exactly_n_streams_across_both_replicas(quota_app) -> None:
    # The proxy picks replicas itself (power of two choices), so a wave may land mostly on one;
    # every wave must admit exactly STREAMS, and some wave must have given each replica at least
    # STREAMS attempts — where per-replica limits would have admitted STREAMS on each.
    splits = []
    for _ in range(4):
        per_replica = await _wave(quota_app, attempts=12)
        splits.append(dict(per_replica))
        if len(per_replica) == 2 and min(per_replica.values()) >= STREAMS:
            break
    else:
        raise AssertionError(f"no wave reached both replicas with >= {STREAMS} attempts each: {splits}")


async def test_a_token_bucket_is_spent_once_across_both_replicas(quota_app) -> None:
    key = quota_app["keys"]["metered"]
    rids: list[str] = []
    generated = 0
    refused = 0
    async with grpc.aio.insecure_channel(quota_app["address"]) as channel:
        stub = eft_pb2_grpc.EftServiceStub(channel)
        for i in range(30):
            rid = f"q-tokens-{uuid.uuid4().hex[:8]}-{i}"
            rids.append(rid)
            try:
                out = await stub.Complete(_request(rid, TOKENS), metadata=_metadata(key), timeout=60)
                generated += out.usage.completion_tokens
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                assert "across all replicas" in (e.details() or ""), e.details()
                refused += 1
                if refused >= 10:
                    break
    assert refused == 10 and TPM <= generated < 2 * TPM + 2 * TOKENS, (generated, refused)

    found = await _await_logged(quota_app["cluster"], set(rids))
    assert set(found) == set(rids)
    served = Counter()
    refusing = set()
    for name, entry in found.values():
        if entry["status"] == "OK":
            served[name] += entry["completion_tokens"]
        else:
            refusing.add(name)
    assert sum(served.values()) == generated
    assert len(refusing) == 2, refusing  # both replicas refuse the key once its bucket is spent ...
    # ... including one that itself generated fewer than TPM tokens: its own bucket would admit.
    assert any(served[name] < TPM for name in refusing), (served, refusing)

    # The one bucket in Redis was charged every token, from both replicas.
    prefix = quota_app["cfg"].cache.key_prefix
    with redis.Redis.from_url(quota_app["cfg"].cache.url) as r:
        level = float(r.hget(f"{prefix}quota:{{metered}}:bucket", "level"))
    assert TPM - generated - 1 < level < TPM - generated + 5, (level, generated)  # + refill (0.5/s)
