"""The coordinator: recipes, fan-out to pools, per-token merge, sampling, stops and streaming.

Transport-neutral: talks to pools through the `PoolClient` protocol (in-process, plain gRPC or
Ray Serve handles implement it) and is wrapped by the gRPC servicer; imports no Ray or gRPC.
"""
