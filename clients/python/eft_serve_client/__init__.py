"""EFT Serve's slim Python client: `pip install ./clients/python` needs only grpcio and protobuf.

`EftClient` (blocking), `AsyncEftClient` (asyncio) and the request builders live in
`eft_serve_client.client`; `eft-client generate PROMPT` is `eft_serve_client.cli`. Messages and
enums (e.g. `eft_pb2.FINISH_REASON_LENGTH`) are in `eft_serve_client.proto_gen.eft.v1.eft_pb2`.
This is the one copy of the client code: the service package's `eft_serve.client` re-exports it.
"""

from eft_serve_client.client import AsyncEftClient, EftClient, build_generate_request, build_merge
from eft_serve_client.proto_gen.eft.v1 import eft_pb2

__all__ = ["AsyncEftClient", "EftClient", "build_generate_request", "build_merge", "eft_pb2"]
