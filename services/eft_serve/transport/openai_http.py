"""The OpenAI-compatible HTTP routes, as an ASGI (FastAPI) app over an `OpenAIApi`.

Owns the HTTP surface only: `GET /v1/models`, `GET /v1/models/{model}`, `POST /v1/completions`,
`POST /v1/chat/completions`; reading the JSON body (bad JSON -> 400), the `Authorization` header
handed to the gate as call metadata, JSON and SSE (`text/event-stream`) responses, and every
error as an OpenAI error body with its HTTP status (`openai_errors`), unknown routes included;
with the routes, the playground page (`GET /playground`, `eft_serve.playground`) that calls them.
Knows nothing of Ray: the Serve coordinator deployment mounts it (`@serve.ingress`), tests run it
under uvicorn.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from eft_serve.playground.routes import mount_playground
from eft_serve.transport.openai_api import OpenAIApi
from eft_serve.transport.openai_errors import error_body, to_http_error
from eft_serve.transport.openai_schema import BadParam

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(exc: BaseException) -> JSONResponse:
    err = to_http_error(exc)
    return JSONResponse(err.body, status_code=err.status, headers=err.headers)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadParam(f"the request body is not valid JSON: {e}") from None


def _response(result: dict[str, Any] | AsyncIterator[str]) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


async def _answer(call: Callable[[], Awaitable[dict[str, Any] | AsyncIterator[str]]]) -> Response:
    try:
        return _response(await call())
    except Exception as e:  # noqa: BLE001 - the HTTP error boundary
        return error_response(e)


def build_openai_app(api: OpenAIApi | None) -> FastAPI:
    """The routes over `api`; None (`http.openai: false`): no routes, every path answers 404."""
    # No generated docs: the routes take raw bodies (validated by `openai_schema`), and a
    # docs page would be one more unauthenticated surface.
    app = FastAPI(title="EFT Serve, OpenAI-compatible", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and methods answer in OpenAI's shape too.
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += (
                "; routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /playground"
                if api is not None
                else "; the OpenAI-compatible API is turned off (http.openai: false)"
            )
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code)

    if api is None:
        return app
    mount_playground(app)  # a static page over the routes below: same keys, nothing of its own

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        async def call() -> dict[str, Any]:
            return api.list_models(api.authenticate(request.headers.items()))

        return await _answer(call)

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str, request: Request) -> Response:
        async def call() -> dict[str, Any]:
            return api.retrieve_model(model, api.authenticate(request.headers.items()))

        return await _answer(call)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        async def call() -> dict[str, Any] | AsyncIterator[str]:
            caller = api.authenticate(request.headers.items())  # once; 401 before any complaint about the body
            return await api.completions(await _json_body(request), caller)

        return await _answer(call)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        async def call() -> dict[str, Any] | AsyncIterator[str]:
            caller = api.authenticate(request.headers.items())  # once; 401 before any complaint about the body
            return await api.chat_completions(await _json_body(request), caller)

        return await _answer(call)

    return app
