"""Independent autoscaling, shown: drive load at the stack and print each pool's replica timeline.

Starts a local multi-node Ray cluster (head + one worker node per pool on 127.0.0.x, each pool
pinned to its node by a custom resource), deploys the stack with the large-base pool autoscaling
(1-3 replicas, target 1 ongoing request) and the small pools autoscaling with a target they do not
reach, streams sampled requests from N client threads for --load-seconds, then idles for
--idle-seconds and prints when each pool's RUNNING replica count changed.

    .venv/bin/python tests/bench/autoscale_timeline.py [--streams 6] [--load-seconds 40] [--idle-seconds 40]
"""

from __future__ import annotations

import argparse
import time

from eft_serve.infra.ports import free_port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--load-seconds", type=float, default=40)
    ap.add_argument("--idle-seconds", type=float, default=40)
    args = ap.parse_args()

    import ray

    from eft_serve.config import EftConfig, demo_config
    from eft_serve.demo.family import ensure_demo_family
    from eft_serve.serve.local import ensure_ray_env
    from eft_serve.serve.names import pool_app_name
    from eft_serve.stack import local_stack
    from eft_serve.testing.loadgen import LoadGenerator, ReplicaTimeline
    from eft_serve.testing.multinode_cluster import (
        LocalMultiNodeCluster,
        autoscaling_demo_config,
        replica_ips,
    )

    roles = ["large_base", "small_base", "small_ft"]
    ensure_ray_env()
    family = ensure_demo_family()
    cluster = LocalMultiNodeCluster(roles).start()
    try:
        ray.init(address=cluster.address, _node_ip_address=cluster.head_ip, namespace="eft", log_to_driver=False)
        data = autoscaling_demo_config(demo_config()).model_dump()
        data["grpc"]["port"] = free_port()
        cfg = EftConfig.model_validate(data)
        with local_stack(cfg, http_port=free_port(), log=lambda m: print(f"[autoscale] {m}")) as eff:
            for role in roles:
                print(
                    f"[autoscale] {role:10s} replicas on {replica_ips(pool_app_name(role))} (node {cluster.node_ips[role]})"
                )
            timeline = ReplicaTimeline(roles).start()
            load = LoadGenerator(
                f"127.0.0.1:{eff.grpc.port}",
                args.streams,
                family.world.held_out_questions()[0].prompt,
                max_new_tokens=64,
                max_seconds=args.load_seconds,
            ).start()
            time.sleep(args.load_seconds)
            result = load.stop()
            print(f"[autoscale] load done: {result.completed} requests, {result.tokens} tokens, errors {result.errors}")
            time.sleep(args.idle_seconds)
            timeline.stop()
            print(
                "\nRUNNING replicas per pool (rows where a count changed; load for the first "
                f"{args.load_seconds:.0f}s, then idle):"
            )
            print(timeline.render())
            print(
                "\nmax replicas: "
                + ", ".join(f"{r}={timeline.max_of(r)}" for r in roles)
                + "; final: "
                + ", ".join(f"{r}={c}" for r, c in timeline.latest().items())
            )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
