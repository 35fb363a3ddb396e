"""The coordinator: a request is validated into a plan (`validate`), decoded token by token or
block by block (`decode`), one step's pool and cache traffic at a time (`fetch`); `service` is the
façade that checks the pools at start-up and wires these together.

Transport-neutral: talks to pools through the `PoolClient` protocol (in-process, plain gRPC or
Ray Serve handles implement it) and is wrapped by the gRPC servicers; imports no Ray, gRPC or Redis.
"""
