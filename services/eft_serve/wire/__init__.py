"""The pool wire format: engine records <-> `eft.v1` pool protobuf messages.

Protobuf only — no gRPC channels or servers, no coordinator records — so that both pool
transports and the result cache's codec can share it from below the coordinator.
"""
