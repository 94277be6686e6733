"""Triton's HTTP/REST protocol (KServe v2 + Triton extensions), enough for an unmodified ``tritonclient.http``.

Paths, bodies and status codes follow the KServe v2 protocol and Triton's server (``src/http_server.cc``,
docs/protocol/*.md): health answers with status codes and empty
bodies, metadata/config/stats in Triton's shapes, ``/infer`` in JSON or with the binary tensor extension (and
gzip/deflate bodies), ``/generate`` and ``/generate_stream`` (SSE, no [DONE]; an error after the first event is
a ``data: {"error": ...}`` event). A decoupled model refuses ``/infer`` with Triton's own message. The
model-repository extension's ``load``/``unload`` build and free the models (repository.py); an unloaded model keeps
its metadata, config and statistics and answers inference with Triton's 404 "has no available versions".
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from .http_common import APIError, ServerState, translate, until_disconnect
from .served import LLMModel, ModelUnloadedError, OneShotModel, parse_json
from .specs import ModelSpec
from .tensors import NUMPY, TensorError, decode_input, encode_output, split_body

router = APIRouter()
log = logging.getLogger("glmkit.serve")
MIN_COMPRESS_BYTES = 1024  # smaller responses go uncompressed whatever Accept-Encoding says (as HTTP allows)
EXTENSIONS = [
    "binary_tensor_data",
    "parameters",
    "statistics",
    "model_configuration",
    "schedule_policy",
    "model_repository",
]
DECOUPLED = "HTTP end point doesn't support models with decoupled transaction policy"


def _state(request: Request) -> ServerState:
    return request.app.state.glmkit


def _model(request: Request, name: str, version: str | None = None, ready: bool = True) -> LLMModel | OneShotModel:
    model = _state(request).models.get(name)
    if model is None or (version not in (None, "", model.spec.version)):
        what = f"'{name}'" + (f" version {version}" if version else "")
        raise APIError(404, f"Request for unknown model: {what} is not found")
    if ready and not model.ready:
        raise APIError(404, str(ModelUnloadedError(name)))
    return model


async def infer(request: Request) -> Response:
    name, version = request.path_params["name"], request.path_params.get("version")
    state = _state(request)
    model = _model(request, name, version)
    if isinstance(model, LLMModel):
        raise APIError(400, DECOUPLED)
    if state.draining:
        raise state.overloaded("the server is shutting down")
    body = await _body(request)
    length = request.headers.get("inference-header-content-length")
    if length is not None and not length.isdigit():
        raise APIError(400, f"Inference-Header-Content-Length: not an integer: {length!r}")
    try:
        head, binary = split_body(body, int(length) if length is not None else None)
    except TensorError as e:
        raise APIError(400, str(e)) from e
    header = await _json(request, head)
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise APIError(400, "request: 'parameters' must be an object")
    inputs = parse_inputs(model.spec, header, binary)
    wanted = header.get("outputs")
    names = [o.name for o in model.spec.outputs]
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and o.get("name") in names for o in wanted):
            raise APIError(400, f"request: 'outputs' must name outputs of model '{name}' ({names})")
    try:
        outputs = await model.infer(inputs, params)
    except Exception as e:
        raise translate(e, state, request.url.path) from e
    default_binary = bool(params.get("binary_data_output", False))
    chosen = wanted if wanted is not None else [{"name": n} for n in names]
    entries, blobs = [], []
    for o in chosen:
        t = next(t for t in model.spec.outputs if t.name == o["name"])
        binary = bool((o.get("parameters") or {}).get("binary_data", default_binary))
        entry, blob = encode_output(t.name, t.datatype, outputs[t.name], binary)
        entries.append(entry)
        if blob is not None:
            blobs.append(blob)
    result: dict[str, Any] = {"model_name": name, "model_version": model.spec.version}
    if "id" in header:
        result["id"] = str(header["id"])
    result["outputs"] = entries
    head_out = json.dumps(result).encode()
    headers: dict[str, str] = {}
    media = "application/json"
    if blobs:
        headers["Inference-Header-Content-Length"] = str(len(head_out))
        media = "application/octet-stream"
    payload = head_out + b"".join(blobs)
    accept = request.headers.get("accept-encoding", "") if len(payload) >= MIN_COMPRESS_BYTES else ""
    if "gzip" in accept:
        payload, headers["Content-Encoding"] = gzip.compress(payload), "gzip"
    elif "deflate" in accept:
        payload, headers["Content-Encoding"] = zlib.compress(payload), "deflate"
    return Response(payload, media_type=media, headers=headers)


# Plain Starlette routes (FastAPI's parameter solving and response merging cost ~0.2 ms of the event loop per
# request), registered first: routing tries the routes in order, ~3 us each
for _path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
    router.add_route(_path, infer, methods=["POST"])


@router.get("/v2/health/live")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    return Response(status_code=400 if _state(request).draining else 200)


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    return {"name": "glmkit", "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/models/stats")
async def all_stats(request: Request) -> dict[str, Any]:
    return {"model_stats": [m.stats.to_triton() for m in _state(request).models.values()]}


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    return _model(request, name, version, ready=False).spec.metadata()


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    model = _model(request, name, version, ready=False)
    if _state(request).draining or not model.ready:
        return JSONResponse({"error": "Model version not ready"}, status_code=400)
    return Response(status_code=200)


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config")
async def model_config(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    return _model(request, name, version, ready=False).spec.config()


@router.get("/v2/models/{name}/stats")
@router.get("/v2/models/{name}/versions/{version}/stats")
async def model_stats(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    return {"model_stats": [_model(request, name, version, ready=False).stats.to_triton()]}


@router.post("/v2/repository/index")
async def repository_index(request: Request) -> list[dict[str, Any]]:
    return [
        {
            "name": n,
            "version": m.spec.version,
            "state": "READY" if m.ready else "UNAVAILABLE",
            "reason": "",
        }
        for n, m in _state(request).models.items()
    ]


@router.post("/v2/repository/models/{name}/load")
async def load(request: Request, name: str) -> Response:
    params = (await _json(request)).get("parameters") if await request.body() else None
    if params is not None and not isinstance(params, dict):
        raise APIError(400, "load: 'parameters' must be an object")
    if params and params.get("config"):
        raise APIError(400, "load: config overrides are not supported; models are defined by the server")
    _model(request, name, ready=False)
    state = _state(request)
    if state.draining:
        raise state.overloaded("the server is shutting down")
    try:
        await state.repository.load(name)
    except Exception as e:  # the checkpoint is gone or unreadable: Triton answers a failed load with 400
        log.exception("loading %s failed", name)
        raise APIError(400, f"failed to load '{name}': {type(e).__name__}: {e}") from e
    return Response(status_code=200)


@router.post("/v2/repository/models/{name}/unload")
async def unload(request: Request, name: str) -> Response:
    _model(request, name, ready=False)
    await _state(request).repository.unload(name)
    return Response(status_code=200)


async def _json(request: Request, body: bytes | None = None) -> dict[str, Any]:
    raw = await request.body() if body is None else body
    try:
        obj = parse_json(raw)
    except ValueError as e:
        raise APIError(400, f"failed to parse the request JSON buffer: {e}") from e
    if not isinstance(obj, dict):
        raise APIError(400, "failed to parse the request JSON buffer: expected a JSON object")
    return obj


async def _body(request: Request) -> bytes:
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").lower()
    limit = _state(request).config.max_body_bytes
    try:
        if encoding == "gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            d = zlib.decompressobj()
        elif encoding == "identity":
            return body
        else:
            raise APIError(400, f"unsupported Content-Encoding {encoding!r} (gzip, deflate)")
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise APIError(400, f"failed to decompress the request body: {e}") from e
    if len(out) > limit:
        raise APIError(413, f"request body exceeds the limit of {limit} bytes once decompressed")
    return out


def _check_shape(spec: ModelSpec, name: str, shape: list[int]) -> None:
    t = spec.input(name)
    assert t is not None
    dims = list(t.dims)
    if spec.max_batch_size > 0:
        if len(shape) != len(dims) + 1 or not 1 <= shape[0] <= spec.max_batch_size:
            raise APIError(
                400,
                f"input '{name}': shape {shape} must be [batch (1..{spec.max_batch_size})] + {dims} "
                f"(max_batch_size {spec.max_batch_size})",
            )
        shape = shape[1:]
    if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape, strict=True)):
        raise APIError(
            400, f"unexpected shape for input '{name}' for model '{spec.name}'. Expected {dims}, got {shape}"
        )


def parse_inputs(spec: ModelSpec, header: dict[str, Any], binary: bytes) -> dict[str, np.ndarray]:
    """Decode and check ``inputs`` against the model's metadata (names, datatypes, shapes, batch sizes)."""
    specs = header.get("inputs")
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise APIError(400, "request: 'inputs' must be a list of tensor objects")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for s in specs:
        name = s.get("name")
        t = spec.input(name) if isinstance(name, str) else None
        if t is None:
            raise APIError(400, f"unexpected inference input '{name}' for model '{spec.name}'")
        if name in arrays:
            raise APIError(400, f"input '{name}' given twice")
        if s.get("datatype") != t.datatype:
            raise APIError(
                400, f"inference input '{name}' data-type is '{s.get('datatype')}', model expects '{t.datatype}'"
            )
        size = (s.get("parameters") or {}).get("binary_data_size") if isinstance(s.get("parameters"), dict) else None
        raw = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise APIError(400, f"input '{name}': binary_data_size {size!r} runs past the binary data")
            raw, offset = binary[offset : offset + size], offset + size
        try:
            arrays[name] = decode_input(s, raw)
        except TensorError as e:
            raise APIError(400, str(e)) from e
        _check_shape(spec, name, list(arrays[name].shape))
    if offset != len(binary):
        raise APIError(400, f"request: {len(binary) - offset} bytes of binary data belong to no input")
    missing = [t.name for t in spec.inputs if not t.optional and t.name not in arrays]
    if missing:
        raise APIError(
            400,
            f"expected {len(spec.inputs)} inputs but got {len(arrays)} inputs for model '{spec.name}'"
            f" (missing {missing})",
        )
    batches = {a.shape[0] for a in arrays.values()} if spec.max_batch_size else {1}
    if len(batches) > 1:
        raise APIError(400, f"inputs of model '{spec.name}' have different batch sizes {sorted(batches)}")
    return arrays


def _generate_inputs(spec: ModelSpec, body: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Generate-extension mapping: keys named like model inputs become tensors, all others request parameters."""
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise APIError(400, "request: 'parameters' must be an object")
    inputs: dict[str, np.ndarray] = {}
    rest: dict[str, Any] = {}
    top = {k: v for k, v in body.items() if k not in ("id", "parameters")}
    for k in params:
        if k in top and spec.input(k) is not None:
            raise APIError(400, f"'{k}' is given both as a top-level input and in parameters")
    for k, v in [*top.items(), *params.items()]:
        t = spec.input(k)
        if t is None:
            rest[k] = v
            continue
        values = v if isinstance(v, list) else [v]
        if any(isinstance(x, (list, dict)) or x is None for x in values):
            raise APIError(400, f"input '{k}': expected a scalar or a 1-D list")
        try:
            if t.datatype == "BYTES":
                if not all(isinstance(x, str) for x in values):
                    raise TypeError("strings expected")
                arr = np.array([x.encode("utf-8") for x in values], dtype=np.object_)
            elif t.datatype == "BOOL":
                if not all(isinstance(x, bool) for x in values):
                    raise TypeError("true/false expected")
                arr = np.array(values, dtype=np.bool_)
            else:
                arr = np.array(values, dtype=NUMPY[t.datatype])
        except (TypeError, ValueError, OverflowError) as e:
            raise APIError(400, f"input '{k}': {t.datatype} value expected ({e})") from e
        inputs[k] = arr.reshape([1] * (spec.max_batch_size > 0) + [len(values)])
    missing = [t.name for t in spec.inputs if not t.optional and t.name not in inputs]
    if missing:
        raise APIError(400, f"missing input(s) {missing} for model '{spec.name}'")
    return inputs, rest


def _json_outputs(spec: ModelSpec, outputs: dict[str, np.ndarray], request_id: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model_name": spec.name, "model_version": spec.version}
    if request_id is not None:
        out["id"] = str(request_id)
    for t in spec.outputs:
        arr = outputs[t.name].reshape(-1)
        values = [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else x for x in arr.tolist()]
        out[t.name] = values[0] if len(values) == 1 else values
    return out


async def _responses(request: Request, name: str, version: str | None) -> tuple[ModelSpec, AsyncIterator, Any]:
    state = _state(request)
    model = _model(request, name, version)
    if state.draining:
        raise state.overloaded("the server is shutting down")
    body = await _json(request)
    inputs, params = _generate_inputs(model.spec, body)

    async def one_shot() -> AsyncIterator[dict[str, np.ndarray]]:
        yield await model.infer(inputs, params)  # type: ignore[union-attr]

    it = model.generate(inputs, params) if isinstance(model, LLMModel) else one_shot()
    return model.spec, it, body.get("id")


@router.post("/v2/models/{name}/generate")
@router.post("/v2/models/{name}/versions/{version}/generate")
async def generate(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    spec, responses, rid = await _responses(request, name, version)
    merged: dict[str, np.ndarray] = {}

    async def collect() -> None:
        async for out in responses:  # several responses (stream=true) are joined into one
            for k, v in out.items():
                merged[k] = np.array([merged[k][0] + v[0]], dtype=object) if k == "text_output" and k in merged else v

    try:
        await until_disconnect(request, collect())
    except APIError:
        raise
    except Exception as e:
        raise translate(e, _state(request), request.url.path) from e
    return _json_outputs(spec, merged, rid)


@router.post("/v2/models/{name}/generate_stream")
@router.post("/v2/models/{name}/versions/{version}/generate_stream")
async def generate_stream(request: Request, name: str, version: str | None = None) -> Response:
    state = _state(request)
    spec, responses, rid = await _responses(request, name, version)
    try:
        first = await anext(responses, None)  # errors before the first response keep their HTTP status
    except Exception as e:
        raise translate(e, state, request.url.path) from e

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield f"data: {json.dumps(_json_outputs(spec, first, rid))}\n\n"
            async for out in responses:
                yield f"data: {json.dumps(_json_outputs(spec, out, rid))}\n\n"
        except Exception as e:
            yield f"data: {json.dumps({'error': translate(e, state, request.url.path).message})}\n\n"
        finally:
            await responses.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(events(), media_type="text/event-stream; charset=utf-8")
