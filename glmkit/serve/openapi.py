"""``/openapi.json``: every route of ``glmkit serve`` with its request and response models.

The protocol modules parse bodies by hand (Triton's binary tensors, vLLM's lenient OpenAI fields, bodies limited
while they are read), so FastAPI cannot infer their schemas; the Pydantic models here describe the wire format
instead, route by route, and the schema is built from them and the running server: the served model names, the
``max_tokens`` and ``n`` limits, and bearer auth when ``--api-key`` is set. A test runs schemathesis against a
live server with this schema, so a model that drifts from what the handlers send fails there.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from . import playground

# ---- shared ----


class Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as vLLM and Triton do


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


class TritonError(BaseModel):
    error: str


# ---- OpenAI ----


class Sampling(Request):
    """vLLM's sampling fields (glmkit/serve/sampling.py); ``null`` means the default."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 = off")
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    min_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = Field(None, max_length=8)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    seed: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1)
    use_beam_search: bool | None = None
    best_of: int | None = Field(None, ge=1, le=16)
    num_beams: int | None = Field(None, ge=1, le=16)
    length_penalty: float | None = Field(None, ge=-100, le=100)
    early_stopping: bool | None = None
    priority: int | None = Field(None, description="lower runs first")


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class CompletionRequest(Sampling):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"examples": [{"prompt": "In the beginning", "max_tokens": 8, "temperature": 0}]},
    )
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text(s) or token ids")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | None = None


class ChatCompletionRequest(Sampling):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [{"messages": [{"role": "user", "content": "Who was Moses?"}], "max_tokens": 8}]
        },
    )
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class InfillRequest(Sampling):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [{"prompt": "And God said, Let there be [MASK]: and there was light.", "max_tokens": 8}]
        },
    )
    model: str | None = None
    prompt: str = Field(description="text with [MASK], [sMASK] or [gMASK] blanks")
    stream: bool | None = Field(None, description="each blank's text as it grows, then the whole answer (SSE)")


class EmbeddingRequest(Request):
    model_config = ConfigDict(
        extra="allow", json_schema_extra={"examples": [{"input": ["In the beginning", "the king said"]}]}
    )
    model: str | None = None
    input: str | list[int] | list[str | list[int]] = Field(description="up to 256 texts or token-id lists")
    encoding_format: Literal["float", "base64"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class InfillResponse(BaseModel):
    id: str
    object: Literal["infill"]
    created: int
    model: str
    text: str
    spans: list[str] = Field(description="each blank's generated text, left to right")
    finish_reason: str | None
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


# ---- Triton / KServe v2 ----


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelConfig(BaseModel):
    """Triton's model configuration in JSON (every leaf present)."""

    model_config = ConfigDict(extra="allow")
    name: str
    backend: str
    max_batch_size: int
    input: list[dict[str, Any]]
    output: list[dict[str, Any]]


class Duration(BaseModel):
    count: int
    ns: int


class ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: dict[str, Duration]
    response_stats: dict[str, Any]
    batch_stats: list[dict[str, Any]]
    memory_usage: list[Any]


class StatsResponse(BaseModel):
    model_stats: list[ModelStatistics]


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: str
    reason: str


class RepositoryIndex(BaseModel):
    ready: bool | None = None


class LoadRequest(Request):
    parameters: dict[str, Any] | None = None


class InputTensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="row-major values; absent with binary_data_size")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(Request):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["In the beginning"]}]}
            ]
        },
    )
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


class GenerateRequest(Request):
    """Inputs by name (``text_input``, ``stream``, ...) and request parameters, top level or in ``parameters``."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"examples": [{"text_input": "In the beginning", "parameters": {"max_tokens": 8}}]},
    )
    id: str | int | None = None
    text_input: str | None = None
    parameters: dict[str, Any] | None = None


class GenerateResponse(BaseModel):
    """``model_name``, ``model_version``, ``id`` and the model's outputs by name (``text_output``, ...)."""

    model_config = ConfigDict(extra="allow")
    model_name: str
    model_version: str
    id: str | None = None


MODELS: list[type[BaseModel]] = [
    OpenAIError,
    TritonError,
    CompletionRequest,
    ChatCompletionRequest,
    InfillRequest,
    EmbeddingRequest,
    CompletionResponse,
    ChatCompletionResponse,
    InfillResponse,
    EmbeddingResponse,
    ModelList,
    ServerMetadata,
    ModelMetadata,
    ModelConfig,
    StatsResponse,
    RepositoryEntry,
    RepositoryIndex,
    LoadRequest,
    InferRequest,
    InferResponse,
    GenerateRequest,
    GenerateResponse,
]

# path -> (method, summary, request model, {status: response model or media type}) per route; the error statuses
# every route shares are added by ``_operation``
JSON, SSE, EMPTY = "application/json", "text/event-stream", ""
V2_MODEL = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
ROUTES: dict[str, tuple[str, str, type[BaseModel] | None, dict[int, Any]]] = {
    "/health": ("get", "Liveness and readiness in one (503 while starting or draining)", None, {200: EMPTY}),
    "/v2/health/live": ("get", "Liveness: 200 from the moment the server listens", None, {200: EMPTY}),
    "/v2/health/ready": ("get", "Readiness: 400 while loading or draining", None, {200: EMPTY, 400: EMPTY}),
    "/v2": ("get", "Server metadata", None, {200: ServerMetadata}),
    "/v2/models/stats": ("get", "Statistics of every model", None, {200: StatsResponse}),
    "/v1/models": ("get", "The served model", None, {200: ModelList}),
    "/v1/completions": ("post", "Text completion", CompletionRequest, {200: (CompletionResponse, SSE)}),
    "/v1/chat/completions": ("post", "Chat", ChatCompletionRequest, {200: (ChatCompletionResponse, SSE)}),
    "/v1/infill": ("post", "GLM blank filling", InfillRequest, {200: (InfillResponse, SSE)}),
    "/v1/embeddings": ("post", "Embeddings (glm_embed)", EmbeddingRequest, {200: EmbeddingResponse}),
    "/metrics": ("get", "Prometheus metrics", None, {200: "text/plain"}),
}
for _prefix in V2_MODEL:
    ROUTES |= {
        _prefix: ("get", "Model metadata", None, {200: ModelMetadata}),
        f"{_prefix}/ready": ("get", "Model readiness", None, {200: EMPTY, 400: TritonError}),
        f"{_prefix}/config": ("get", "Model configuration", None, {200: ModelConfig}),
        f"{_prefix}/stats": ("get", "Model statistics", None, {200: StatsResponse}),
        f"{_prefix}/infer": (
            "post",
            "Inference (one-shot models; JSON or the binary tensor extension)",
            InferRequest,
            {200: (InferResponse, "application/octet-stream")},
        ),
        f"{_prefix}/generate": ("post", "Generate extension", GenerateRequest, {200: GenerateResponse}),
        f"{_prefix}/generate_stream": ("post", "Generate extension, streamed", GenerateRequest, {200: SSE}),
    }

ROUTES |= {
    "/v2/repository/index": ("post", "The model repository", RepositoryIndex, {200: list[RepositoryEntry]}),
    "/v2/repository/models/{name}/load": ("post", "Mark a model ready", LoadRequest, {200: EMPTY}),
    "/v2/repository/models/{name}/unload": ("post", "Mark a model unavailable", None, {200: EMPTY}),
}

SSE_EVENT = {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}
HEALTH = ("/health", "/v2/health/live", "/v2/health/ready")


def _content(what: Any) -> dict[str, Any] | None:
    """An OpenAPI ``content`` map: a model (JSON), a media type (any body), or a tuple of them."""
    parts = what if isinstance(what, tuple) else (what,)
    content: dict[str, Any] = {}
    for part in parts:
        if part == SSE:  # one event: a JSON chunk in ``data`` (OpenAI ends with ``[DONE]``)
            content[SSE] = {"schema": {"type": "object", "required": ["data"], "properties": SSE_EVENT}}
        elif isinstance(part, str):
            if part:
                content[part] = {"schema": {"type": "string"}}
        elif getattr(part, "__origin__", None) is list:
            (item,) = part.__args__
            content[JSON] = {"schema": {"type": "array", "items": _ref(item)}}
        else:
            content[JSON] = {"schema": _ref(part)}
    return content or None


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(path: str, method: str, summary: str, body: Any, answers: dict[int, Any], auth: bool) -> dict:
    openai = path.startswith("/v1/")
    error = OpenAIError if openai else TritonError
    statuses = dict(answers)
    if path not in HEALTH:
        statuses.setdefault(503, error)  # starting (model not loaded yet), draining, or overloaded
        if auth:
            statuses.setdefault(401, error)
        if "{name}" in path:
            statuses.setdefault(404, error)
        if method == "post":
            statuses |= {s: statuses.get(s, error) for s in (400, 413)}
            if openai:
                statuses |= {404: error, 429: error}
    else:
        statuses.setdefault(503, EMPTY)
    responses = {}
    for status, what in sorted(statuses.items()):
        entry: dict[str, Any] = {"description": "OK" if status == 200 else f"HTTP {status}"}
        if (content := _content(what)) is not None:
            entry["content"] = content
        if status in (429, 503) and path not in HEALTH:
            entry["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}
        responses[str(status)] = entry
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    op["operationId"] = f"{method}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}"
    if body is not None:
        op["requestBody"] = {"required": body is not LoadRequest, "content": _content(body)}
    params = [p for p in ("name", "version") if f"{{{p}}}" in path]
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"$ref": f"#/components/schemas/_{p}"}}
            for p in params
        ]
    if not auth or path in HEALTH:
        op["security"] = []
    return {method: op}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app`` (its state must be loaded: the middleware answers 503 before)."""
    from .. import __version__

    state = app.state.glmkit
    config = state.config
    routes, models = ROUTES, MODELS
    if config.playground:
        routes, models = ROUTES | playground.ROUTES, [*MODELS, *playground.MODELS]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    schemas = defs["$defs"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "InfillRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field]["anyOf"][0]["maximum"] = config.limits.max_tokens
        props["n"]["anyOf"][0]["maximum"] = config.limits.max_n
    schemas["_name"] = {"type": "string", "enum": sorted(state.models)}
    schemas["_version"] = {"type": "string", "enum": sorted({m.spec.version for m in state.models.values()})}
    paths = {
        path: _operation(path, *route, auth=bool(config.api_key) and path not in playground.PUBLIC_PATHS)
        for path, route in routes.items()
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "glmkit serve", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if config.api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
