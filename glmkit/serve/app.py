"""The HTTP application: one FastAPI app with the Triton/KServe v2 routes, the OpenAI routes and /metrics.

The protocol modules only parse and format; what they share with the app (the error type, the server state,
exception mapping, disconnects) is http_common.py, so neither imports this module. Everything a production front
needs lives here, once: bearer-token auth on every route but health, a request-body limit enforced while reading
(a lying Content-Length does not get past it), JSON access logs, error bodies in each protocol's own shape
(``{"error": "..."}`` for Triton, ``{"error": {"message", "type", "code"}}`` for OpenAI), backpressure answers
with ``Retry-After``, and a lifespan that drains in-flight requests before the engines stop. Any unexpected
exception becomes a logged 500 and the server keeps serving.

The app can start before its model (``build_app(None, config)``): until ``app.state.glmkit`` is set,
``/v2/health/live`` answers 200, readiness says not ready and every other route 503 + ``Retry-After``, so a
first start that compiles the C++ kernels is visibly alive. ``drain`` is what SIGTERM runs before the listener
closes: not ready, new work refused with 503 + ``Retry-After``, in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import metrics, openai_api, playground, triton_http
from .http_common import APIError, ServerConfig, ServerState, error_response, translate
from .openapi import openapi_schema

access_log = logging.getLogger("glmkit.access")


async def drain(state: ServerState) -> bool:
    """Stop taking work and wait up to ``drain_timeout`` s for the requests in flight; True if all finished.

    New requests get 503 + ``Retry-After`` meanwhile (the handlers check ``draining``, the engine refuses)."""
    state.draining = True
    deadline = time.monotonic() + state.config.drain_timeout
    idle = state.engine is None or await state.engine.drain(state.config.drain_timeout)
    while state.active and time.monotonic() < deadline:  # streams sending their last events, one-shot batches
        await asyncio.sleep(0.02)
    return idle and not state.active


class BodyTooLarge(Exception):
    pass


class Middleware:
    """Pure ASGI: access log, auth and the body limit, without buffering streamed responses."""

    OPEN = ("/v2/health/live", "/v2/health/ready", "/health")
    UNCOUNTED = (*OPEN, "/metrics")  # a drain does not wait for probes and scrapes

    def __init__(self, app: Callable[..., Awaitable[None]], config: ServerConfig) -> None:
        self.app, self.config = app, config
        # the playground's pages: no key (the page asks for it) and served while the model loads
        self.public = playground.PUBLIC_PATHS if config.playground else frozenset()
        self._prefix, self._ids = uuid.uuid4().hex[:8], itertools.count()  # os.urandom per request is slow here

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, start = scope["path"], time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id") or f"{self._prefix}-{next(self._ids)}"
        info: dict[str, Any] = {"status": 0, "bytes_in": 0}

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        async def receive_limited() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                info["bytes_in"] += len(message.get("body", b""))
                if info["bytes_in"] > self.config.max_body_bytes:
                    raise BodyTooLarge
            return message

        state: ServerState | None = scope["app"].state.glmkit
        counted = state is not None and path not in self.UNCOUNTED
        if counted:
            state.active += 1
        try:
            length = headers.get("content-length", "0")
            public = path in self.OPEN or path in self.public
            if self.config.api_key and not public and not self._authorized(headers):
                await error_response(path, 401, "missing or invalid API key (Authorization: Bearer <key>)")(
                    scope, receive, send_logged
                )
            elif state is None and path not in self.public:
                await self._loading(path, scope, receive, send_logged)
            elif length.isdigit() and int(length) > self.config.max_body_bytes:
                await self._too_large(path, scope, receive, send_logged)
            else:
                try:
                    await self.app(scope, receive_limited, send_logged)
                except BodyTooLarge:
                    if info["status"] == 0:
                        await self._too_large(path, scope, receive, send_logged)
        finally:
            if counted:
                state.active -= 1
            access_log.info(
                json.dumps(
                    {
                        "ts": round(time.time(), 3),
                        "request_id": rid,
                        "client": (scope.get("client") or ["-"])[0],
                        "method": scope["method"],
                        "path": path,
                        "status": info["status"],
                        "bytes_in": info["bytes_in"],
                        "ms": round((time.perf_counter() - start) * 1000, 2),
                    }
                )
            )

    def _authorized(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        return auth == f"Bearer {self.config.api_key}"

    async def _loading(self, path: str, scope: dict, receive: Callable, send: Callable) -> None:
        """Before the model is loaded: alive, not ready, everything else 503 + Retry-After."""
        if path == "/v2/health/live":
            response = Response(status_code=200)
        elif path in self.OPEN:
            response = Response(status_code=400 if path == "/v2/health/ready" else 503)  # Triton's "not ready"
        else:
            retry = {"Retry-After": str(self.config.retry_after)}
            response = error_response(path, 503, "the server is starting: the model is not loaded yet", retry)
        await response(scope, receive, send)

    async def _too_large(self, path: str, scope: dict, receive: Callable, send: Callable) -> None:
        msg = f"request body exceeds the limit of {self.config.max_body_bytes} bytes"
        await error_response(path, 413, msg)(scope, receive, send)


def build_app(state: ServerState | None, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app over ``state`` (engines already started); shutting it down drains and stops them.

    With ``state=None`` the app serves ``config`` and answers as starting until ``app.state.glmkit`` is set."""
    if state is None and config is None:
        raise ValueError("build_app: give the server state, or the config of a server still loading its model")
    config = state.config if state is not None else config
    assert config is not None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        current: ServerState | None = app.state.glmkit
        if current is None:  # stopped while loading
            return
        await drain(current)
        if current.engine is not None:
            current.engine.shutdown()
        for b in current.batchers:
            b.shutdown()

    # FastAPI's own OpenTelemetry hooks look up the global providers on every request (~9 % of the event loop under
    # scoring load); they stay on where OpenTelemetry is configured through OTEL_* variables
    otel = any(k.startswith("OTEL_") for k in os.environ)
    quiet = {} if otel else {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    app = FastAPI(title="glmkit", lifespan=lifespan, docs_url=None, redoc_url=None, **quiet)
    app.state.glmkit = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return error_response(request.url.path, e.status, e.message, e.headers, e.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(request.url.path, 400, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        text = {404: "Not Found", 405: "Method Not Allowed"}.get(e.status_code, str(e.detail))
        return error_response(request.url.path, e.status_code, text)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> Response:
        err = translate(e, request.app.state.glmkit, request.url.path)
        return error_response(request.url.path, err.status, err.message, err.headers, err.kind)

    @app.get("/health")
    async def health(request: Request) -> Response:
        return Response(status_code=200 if not request.app.state.glmkit.draining else 503)

    app.include_router(triton_http.router)
    app.include_router(openai_api.router)
    app.include_router(metrics.router)
    if config.playground:
        app.include_router(playground.router)
    app.add_middleware(Middleware, config=config)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app
