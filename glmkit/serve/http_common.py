"""What the HTTP routers share: the error answer, the server's state, exception mapping and disconnects.

The OpenAI routes (openai_api.py), the Triton routes (triton_http.py) and the application around them (app.py)
import these from here, so a router never imports the app that includes it: each router module imports alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .batcher import BatcherError, DynamicBatcher
from .engine import AsyncLLMEngine, EngineClosedError
from .sampling import Limits
from .scheduler import QueueFullError
from .served import GenerationService, LLMModel, ModelUnloadedError, OneShotModel

log = logging.getLogger("glmkit.serve")
T = TypeVar("T")


class APIError(Exception):
    """An error answer: HTTP ``status``, a message, and optional headers (``Retry-After``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, kind: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        unavailable = "ServiceUnavailableError"
        named = {401: "AuthenticationError", 404: "NotFoundError", 429: unavailable, 503: unavailable}
        self.kind = kind or named.get(status, "BadRequestError" if status < 500 else "InternalServerError")


@dataclass
class ServerConfig:
    """HTTP-side settings of ``glmkit serve``.

    Attributes:
        api_key: bearer token required on every route but health; ``None`` = no auth.
        max_body_bytes: largest request body (after decompression), else 413.
        limits: per-request limits (max_tokens, prompt tokens, n).
        served_model_name: the model id of the OpenAI API.
        drain_timeout: seconds to let in-flight requests finish on shutdown.
        retry_after: seconds suggested to clients refused for load (``Retry-After``).
        playground: serve the playground page at ``/`` (playground.py).
    """

    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    limits: Limits = field(default_factory=Limits)
    served_model_name: str = "llm"
    drain_timeout: float = 30.0
    retry_after: int = 1
    playground: bool = True


@dataclass
class ServerState:
    config: ServerConfig
    engine: AsyncLLMEngine
    service: GenerationService
    models: dict[str, LLMModel | OneShotModel]
    batchers: list[DynamicBatcher]
    metrics: Any = None
    draining: bool = False
    started: float = field(default_factory=time.time)
    active: int = 0  # HTTP requests in flight (health and metrics aside): what a drain waits for
    repository: Any = None  # repository.ModelRepository: loads and unloads the models (engine is None without llm)

    def overloaded(self, message: str, status: int = 503) -> APIError:
        return APIError(status, message, {"Retry-After": str(self.config.retry_after)})


def is_openai(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_response(
    path: str, status: int, message: str, headers: dict[str, str] | None = None, kind: str = ""
) -> Response:
    if is_openai(path):
        err = APIError(status, message, kind=kind)
        body: dict[str, Any] = {"error": {"message": message, "type": err.kind, "param": None, "code": status}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


def translate(e: Exception, state: ServerState, path: str) -> APIError:
    """Map engine/batcher exceptions to HTTP: bad values 400, full queues 429 (OpenAI) / 503 (Triton)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, (ValueError, UnicodeDecodeError)):
        return APIError(400, str(e))
    if isinstance(e, ModelUnloadedError):
        return APIError(404, str(e))
    if isinstance(e, QueueFullError):
        return state.overloaded(str(e), 429 if is_openai(path) else 503)
    if isinstance(e, BatcherError):
        return state.overloaded(str(e))
    if isinstance(e, EngineClosedError):
        return state.overloaded("the server is shutting down")
    log.exception("unexpected error on %s", path)
    return APIError(500, f"internal error: {type(e).__name__}")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "client disconnected")
