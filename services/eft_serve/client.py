"""Python clients for the `eft.v1.EftService` gRPC API: `EftClient` (sync) and `AsyncEftClient`.

A re-export, kept for existing importers: the one copy of the client code is the slim client's
`eft_serve_client` (clients/python; grpcio and protobuf only, so callers need no torch,
transformers or Ray). This distribution ships that package as well, so it depends on nothing
new. Messages built and returned here are `eft_serve_client.proto_gen` classes, registered in
that package's private descriptor pool (see `eft_serve_client.client`): field- and wire-identical
to `eft_serve.proto_gen`'s, but other Python classes.
"""

from __future__ import annotations

from eft_serve_client.client import AsyncEftClient, EftClient, build_generate_request, build_merge

__all__ = ["AsyncEftClient", "EftClient", "build_generate_request", "build_merge"]
