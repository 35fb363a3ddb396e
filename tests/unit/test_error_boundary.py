"""The one error boundary: every servicer method's failure becomes a status, never a trace."""

from __future__ import annotations

import grpc
import pytest

from eft_serve.errors import NotFound
from eft_serve.transport.error_boundary import RpcFailed, error_boundary, set_on_serve_context


class ServeContext:
    """Stands in for Ray Serve's RayServegRPCContext: records what the boundary sets."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class Servicer:
    @error_boundary(set_on_serve_context)
    async def Unary(self, request: str, grpc_context: ServeContext) -> str:  # noqa: N802
        if request == "missing":
            raise NotFound("unknown recipe 'x'; available recipes: upscale")
        if request == "bug":
            raise KeyError("internal detail that must not leak")
        return request.upper()

    @error_boundary(set_on_serve_context)
    async def Stream(self, request: str, grpc_context: ServeContext):  # noqa: N802
        yield "first"
        if request == "bug":
            raise RuntimeError("boom")
        yield "second"


@pytest.mark.parametrize("by_keyword", [False, True])
async def test_unary_errors_become_statuses(by_keyword: bool) -> None:
    svc, ctx = Servicer(), ServeContext()

    def call(req: str):
        return svc.Unary(req, grpc_context=ctx) if by_keyword else svc.Unary(req, ctx)

    assert await call("ok") == "OK" and ctx.code is None
    with pytest.raises(RpcFailed):
        await call("missing")
    assert ctx.code == grpc.StatusCode.NOT_FOUND and "available recipes" in ctx.details
    with pytest.raises(RpcFailed) as err:
        await call("bug")
    assert ctx.code == grpc.StatusCode.INTERNAL and "ref" in ctx.details
    assert "internal detail" not in ctx.details and err.value.__suppress_context__


async def test_streaming_errors_after_first_message_become_statuses() -> None:
    svc, ctx = Servicer(), ServeContext()
    got: list[str] = []
    with pytest.raises(RpcFailed):
        async for m in svc.Stream("bug", grpc_context=ctx):
            got.append(m)
    assert got == ["first"] and ctx.code == grpc.StatusCode.INTERNAL and "boom" not in ctx.details


def test_serve_still_sees_the_grpc_context_parameter() -> None:
    # Ray Serve decides whether to pass `grpc_context` from the method's signature.
    import inspect

    assert "grpc_context" in inspect.signature(Servicer.Unary).parameters
    assert "grpc_context" in inspect.signature(Servicer.Stream).parameters
