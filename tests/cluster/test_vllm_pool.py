"""A vLLM pool inside a real Ray Serve replica (the session's local multi-node cluster).

Checks what only a replica can show: vLLM starts its engine process from a Ray actor (spawn, no
`__main__` guard there), the pool answers `Info` and `NextTokenLogprobs` through a Serve handle with
the HF engine's fingerprints and numbers (within the contract tolerance), and a trailing block
through the same handle. One replica of the demo `large_base` on its node group; the app is
deleted at the end. Costs one vLLM start (~30-90 s on a shared 2-core box).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from eft_serve.config import demo_config
from eft_serve.engine.hf_engine import HFEngine
from eft_serve.engine.types import SequenceQuery
from eft_serve.infra.ports import free_port
from eft_serve.proto_gen.eft.v1 import pool_pb2
from eft_serve.testing.multinode_cluster import pool_resource
from eft_serve.wire.pool_messages import info_from_proto, queries_to_proto, results_from_proto

APP = "pool-vllm-check"
TOL = 1e-4

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.environ.get("EFT_WITH_VLLM", "1") == "0", reason="EFT_WITH_VLLM=0: no vLLM in this setup"),
]


def test_vllm_pool_in_a_serve_replica_matches_hf(ray_cluster, demo_family) -> None:
    from ray import serve

    from eft_serve.serve.app import pool_app

    data = demo_config().pools["large_base"].model_dump(mode="json")
    data["engine"] = "vllm"
    data["vllm"].update(cpu_kv_space_gib=1, max_num_seqs=16)
    data["replica"]["node_group_resource"] = pool_resource("large_base")
    # A session that also runs the whole stack has started Serve with its proxies already.
    serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1", "port": free_port()})
    started = time.perf_counter()
    handle = serve.run(pool_app({"role": "large_base", "pool": data}), name=APP, route_prefix=None)
    try:
        print(f"vLLM pool replica ready in {time.perf_counter() - started:.1f}s")
        hf = HFEngine.load(demo_family.paths["large_base"], name="large_base", device="cpu")
        info = info_from_proto(pool_pb2.ModelInfo.FromString(handle.Info.remote().result(timeout_s=120)))
        assert info.vocab_fingerprint == hf.info.vocab_fingerprint
        assert info.model_fingerprint == hf.info.model_fingerprint
        # The replica really runs vLLM: it keeps room for the sampled token (one position less).
        assert info.max_context == hf.info.max_context - 1

        rng = np.random.default_rng(0)
        queries = [
            SequenceQuery([int(x) for x in rng.integers(1, 700, 30)], candidate_ids=[4, 9]),
            SequenceQuery([int(x) for x in rng.integers(1, 700, 60)], num_positions=4),
        ]
        for k in (0, 20):
            msg = queries_to_proto(queries, k, time.time() + 60)
            reply = pool_pb2.NextTokenLogprobsResponse.FromString(
                handle.NextTokenLogprobs.remote(msg.SerializeToString()).result(timeout_s=120)
            )
            got = results_from_proto(reply)
            ref = hf.next_token_logprobs(queries, k)
            for g, r in zip(got, ref):
                assert len(g.positions) == len(r.positions)
                for gp, rp in zip(g.positions, r.positions):
                    if k == 0:
                        assert np.abs(gp.full_logprobs - rp.full_logprobs).max() < TOL
                    else:
                        assert np.abs(gp.top_logprobs - rp.top_logprobs).max() < TOL
                    assert gp.candidate_logprobs.shape == rp.candidate_logprobs.shape
                    assert np.all(np.abs(gp.candidate_logprobs - rp.candidate_logprobs) < TOL)
            assert got[0].positions[0].candidate_logprobs.shape == (2,)
    finally:
        serve.delete(APP)
