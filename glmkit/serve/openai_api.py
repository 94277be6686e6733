"""OpenAI-compatible routes (vLLM's shapes) so the unmodified ``openai`` client works: models, completions,
chat completions and embeddings, plus glmkit's ``/v1/infill`` for GLM blank filling.

Streams are SSE ending in ``data: [DONE]``; the first engine output is awaited before the response starts, so a
refused request (bad value, full queue) still gets its status code (400, 429 + Retry-After). A client that goes
away — mid-stream or while waiting for a non-streamed answer — cancels its engine requests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..chatglm.chat import is_chat_tokenizer, served_chat_prompt
from ..masks import find_blanks
from ..prompts import continuation_ids, infilling_ids, layout
from .http_common import APIError, ServerState, translate, until_disconnect
from .request import Fill
from .sampling import SamplingParams
from .scoring import ScoreRow
from .served import Delta, OneShotModel, parse_json
from .specs import EMBED
from .text import CHAT_STOP, chat_prompt, safe_decode

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.glmkit


async def _body(request: Request, served: str = "llm") -> dict[str, Any]:
    """The request's JSON object, for the OpenAI model that Triton's model ``served`` serves."""
    try:
        body = parse_json(await request.body())
    except ValueError as e:
        raise APIError(400, f"request body: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    state = _state(request)
    if body.get("model") not in (None, state.config.served_model_name):
        raise APIError(404, f"The model `{body.get('model')}` does not exist.", kind="NotFoundError")
    if not state.models[served].ready:  # unloaded through Triton's model-repository extension
        name = state.config.served_model_name
        raise APIError(404, f"The model `{name}` is not loaded ('{served}' is unloaded).", kind="NotFoundError")
    if state.draining:
        raise state.overloaded("the server is shutting down")
    return body


def _prompts(state: ServerState, prompt: Any, params: SamplingParams) -> list[tuple[list[int], Fill, str]]:
    """(ids, fill mode, prompt text) per prompt: text → the family's continuation prompt (GLM ``[CLS] text [gMASK]``);
    token ids are the model input as given (``model_input`` completes them)."""
    tok, family = state.service.tok, state.service.family
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        try:  # before any tokenizing: a request that can never be queued whole is refused outright
            state.service.check_size(len(prompt), params)
        except ValueError as e:
            raise APIError(400, str(e)) from e
    if isinstance(prompt, str):
        return [(continuation_ids(tok, prompt, family), "all", prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [(continuation_ids(tok, p, family), "all", p) for p in prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [(list(prompt), "first", _ids_text(state, prompt))]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt):
        if all(isinstance(t, int) and not isinstance(t, bool) for p in prompt for t in p):
            return [(list(p), "first", _ids_text(state, p)) for p in prompt]
    raise APIError(400, "prompt: expected a string, a list of strings, or token ids (a list or a list of lists)")


def _ids_text(state: ServerState, ids: list[int]) -> str:
    """The text of a token-id prompt (for ``echo``), once its ids are known to be in the vocabulary."""
    try:
        state.service.check_prompt(ids)
    except ValueError as e:
        raise APIError(400, str(e)) from e
    return safe_decode(state.service.tok, ids)


def _params(state: ServerState, body: dict[str, Any], default_max: int, chat: bool = False) -> SamplingParams:
    d = dict(body)
    if chat:
        d["max_tokens"] = body.get("max_completion_tokens", body.get("max_tokens"))
        d["logprobs"] = body.get("top_logprobs", 0) if body.get("logprobs") else None
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, list) else stop
        # a ChatGLM model ends its answer with a stop id; glmkit's plain chat format at the next "User:" line
        d["stop"] = stop if is_chat_tokenizer(state.service.tok) else stop + [CHAT_STOP]
    elif isinstance(body.get("logprobs"), bool):
        raise APIError(400, "logprobs: expected an int (the number of top log-probabilities)")
    if body.get("suffix"):
        raise APIError(400, "suffix: not supported (use /v1/infill with [MASK] for GLM blank filling)")
    options = body.get("stream_options")
    if options is not None:
        if not body.get("stream"):
            raise APIError(400, "stream_options: only allowed with stream=true")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise APIError(400, 'stream_options: expected an object such as {"include_usage": true}')
    try:
        return SamplingParams.from_dict(d, state.config.limits, default_max)
    except ValueError as e:
        raise APIError(400, str(e)) from e


def _token_text(state: ServerState, t: int) -> str:
    return safe_decode(state.service.tok, [t], skip_special_tokens=False)


def _completion_logprobs(state: ServerState, deltas: list[Delta], offset: int) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    for d in deltas:
        for lp in d.logprobs:
            text = _token_text(state, lp.token_id)
            offsets.append(offset)
            offset += len(text)
            tokens.append(text)
            lps.append(lp.logprob)
            tops.append({_token_text(state, t): v for t, v in lp.top} or None)
    return {"text_offset": offsets, "token_logprobs": lps, "tokens": tokens, "top_logprobs": tops}


def _chat_logprobs(state: ServerState, deltas: list[Delta]) -> dict[str, Any]:
    def entry(t: int, v: float) -> dict[str, Any]:
        text = _token_text(state, t)
        return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for d in deltas
            for lp in d.logprobs
        ]
    }


async def _start(state: ServerState, request: Request, stream: AsyncIterator[Delta]):
    """The stream and its first delta (awaited here so refusals keep their status code)."""
    try:
        first = await until_disconnect(request, anext(stream, None))
    except APIError:
        raise
    except Exception as e:
        raise translate(e, state, request.url.path) from e
    return stream, first


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    name = state.config.served_model_name
    card = {"id": name, "object": "model", "created": int(state.started), "owned_by": "glmkit", "root": name}
    if state.engine is None:  # llm unloaded
        return {"object": "list", "data": []}
    card |= {"parent": None, "max_model_len": state.engine.engine.config.max_model_len}
    return {"object": "list", "data": [card]}


async def _generate(request: Request, chat: bool) -> Response:
    state = _state(request)
    body = await _body(request)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "messages: expected a list of message objects")
    params = _params(state, body, state.config.limits.max_tokens if chat else 16, chat)
    if chat:
        tok, room = state.service.tok, state.config.limits.max_prompt_tokens
        try:  # a ChatGLM model gets its own template, trimmed to fit from the oldest turn
            glm = served_chat_prompt(tok, messages, room, state.engine.engine.config.max_model_len, params.max_tokens)
            text = chat_prompt(messages) if glm is None else safe_decode(tok, glm.ids, skip_special_tokens=False)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        except TypeError as e:  # a text part whose "text" is not a string
            raise APIError(400, f"messages: a text part's text must be a string ({e})") from e
        prompts: list[tuple[list[int], Fill, str]]
        if glm is None:
            prompts = [(continuation_ids(tok, text, state.service.family), "all", text)]
        else:  # the template's ids are the model input as they are, and its stop ids end the answer
            params.stop_token_ids = [*params.stop_token_ids, *glm.stop_ids]
            prompts = [(glm.ids, "first", text)]
    else:
        prompts = _prompts(state, body.get("prompt"), params)
    priority = body.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise APIError(400, "priority: expected an int")
    stream = state.service.stream([(ids, fill) for ids, fill, _ in prompts], params, priority=priority)
    merged, first = await _start(state, request, stream)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time())}
    head["model"] = state.config.served_model_name
    echo = bool(body.get("echo")) and not chat
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = _stream_events(state, request, head, prompts, params, merged, first, chat, echo, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    deltas: dict[int, list[Delta]] = {}

    async def collect() -> None:
        d = first
        while d is not None:
            deltas.setdefault(d.index, []).append(d)
            d = await anext(merged, None)

    try:
        await until_disconnect(request, collect())
    except APIError:
        raise
    except Exception as e:
        raise translate(e, state, request.url.path) from e
    choices, completion_tokens = [], 0
    for index in range(len(prompts) * params.n):
        ds = deltas.get(index, [])
        text = "".join(d.text for d in ds)
        last = ds[-1] if ds else Delta(index, "", finish_reason="abort")
        if last.error:
            raise APIError(500, last.error)
        completion_tokens += sum(len(d.token_ids) for d in ds)
        prefix = prompts[index // params.n][2] if echo else ""
        if chat:
            choice: dict[str, Any] = {"index": index, "message": {"role": "assistant", "content": text}}
            choice["logprobs"] = _chat_logprobs(state, ds) if params.logprobs is not None else None
        else:
            choice = {"index": index, "text": prefix + text}
            choice["logprobs"] = _completion_logprobs(state, ds, len(prefix)) if params.logprobs is not None else None
        choice |= {"finish_reason": last.finish_reason, "stop_reason": None}
        choices.append(choice)
    prompt_tokens = sum(len(ids) for ids, _, _ in prompts) * params.n
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return _json(head | {"choices": choices, "usage": usage | {"total_tokens": prompt_tokens + completion_tokens}})


def _json(obj: dict[str, Any]) -> Response:
    return Response(json.dumps(obj), media_type="application/json")


async def _stream_events(state, request, head, prompts, params, merged, first, chat, echo, include_usage):
    obj = "chat.completion.chunk" if chat else "text_completion"
    started: set[int] = set()
    completion_tokens = 0

    def chunk(index: int, text: str | None, finish: str | None, d: Delta | None) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {}
            if index not in started:
                delta["role"] = "assistant"
            if text is not None and (text or index not in started):
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta}
            choice["logprobs"] = _chat_logprobs(state, [d]) if d and params.logprobs is not None else None
        else:
            prefix = prompts[index // params.n][2] if echo and index not in started else ""
            choice = {"index": index, "text": prefix + (text or "")}
            choice["logprobs"] = _completion_logprobs(state, [d], 0) if d and params.logprobs is not None else None
        started.add(index)
        choice |= {"finish_reason": finish, "stop_reason": None}
        return head | {"object": obj, "choices": [choice]}

    try:
        d = first
        while d is not None:
            if d.error:
                raise RuntimeError(d.error)
            completion_tokens += len(d.token_ids)
            if d.text or d.logprobs or d.index not in started:
                yield _sse(chunk(d.index, d.text, None, d))
            if d.finish_reason:
                yield _sse(chunk(d.index, None, d.finish_reason, None))
            d = await anext(merged, None)
        if include_usage:
            prompt_tokens = sum(len(ids) for ids, _, _ in prompts) * params.n
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
            usage["total_tokens"] = prompt_tokens + completion_tokens
            yield _sse(head | {"object": obj, "choices": [], "usage": usage})
    except Exception as e:
        err = translate(e, state, request.url.path)
        yield _sse({"error": {"message": err.message, "type": err.kind, "param": None, "code": err.status}})
    finally:
        await merged.aclose()
    yield "data: [DONE]\n\n"


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


@router.post("/v1/infill")
async def infill(request: Request) -> Response:
    """GLM blank filling: ``prompt`` with [MASK]/[sMASK]/[gMASK] → the filled text and each blank's span.

    ``stream: true`` sends every blank's text as it grows (``infill.chunk`` events naming their ``blank``), then
    the whole answer as one last event, as the unstreamed response has it."""
    state = _state(request)
    body = await _body(request)
    if not isinstance(body.get("prompt"), str):
        raise APIError(400, "prompt: expected a string with [MASK], [sMASK] or [gMASK] blanks")
    tok, family = state.service.tok, state.service.family
    try:
        ids = infilling_ids(tok, body["prompt"], family)
    except ValueError as e:
        raise APIError(400, f"prompt: {e}") from e
    blanks = find_blanks(ids, layout(tok.special, family).blank_ids())
    streamed = bool(body.get("stream"))
    params = _params(state, {**body, "n": 1, "stream": streamed or None}, 16)
    head = {"id": "infill-" + uuid.uuid4().hex, "created": int(time.time()), "model": state.config.served_model_name}
    stream = state.service.stream([(ids, "all")], params, every_span=streamed)
    merged, first = await _start(state, request, stream)
    if streamed:
        events = _infill_events(state, request, head, ids, blanks, merged, first)
        return StreamingResponse(events, media_type="text/event-stream")
    try:
        last = first
        while last is not None and last.finish_reason is None:
            last = await until_disconnect(request, anext(merged, None))
    except APIError:
        raise
    except Exception as e:
        raise translate(e, state, request.url.path) from e
    if last is None or last.error:
        raise APIError(500, last.error if last else "generation ended without a result")
    return _json({**head, "object": "infill", **_filled(state, ids, blanks, last)})


def _filled(state: ServerState, ids: list[int], blanks: list[int], last: Delta) -> dict[str, Any]:
    """The answer of an infill: the text with every blank filled, each blank's span, the finish reason, usage."""
    tok = state.service.tok
    filled = dict(zip(blanks, last.spans, strict=False))
    completed = [t for i, tok_id in enumerate(ids) for t in (filled[i] if i in filled else [tok_id])]
    generated = sum(len(s) for s in last.spans)
    return {
        "text": safe_decode(tok, completed),
        "spans": [safe_decode(tok, s) for s in last.spans],
        "finish_reason": last.finish_reason,
        "usage": {"prompt_tokens": len(ids), "completion_tokens": generated, "total_tokens": len(ids) + generated},
    }


async def _infill_events(state, request, head, ids, blanks, merged, first):
    try:
        d = first
        while d is not None:
            if d.error:
                raise RuntimeError(d.error)
            if d.text:
                blank = d.span_index if d.span_index >= 0 else len(blanks) - 1
                yield _sse({**head, "object": "infill.chunk", "blank": blank, "text": d.text, "finish_reason": None})
            if d.finish_reason:
                yield _sse({**head, "object": "infill", **_filled(state, ids, blanks, d)})
            d = await anext(merged, None)
    except Exception as e:
        err = translate(e, state, request.url.path)
        yield _sse({"error": {"message": err.message, "type": err.kind, "param": None, "code": err.status}})
    finally:
        await merged.aclose()
    yield "data: [DONE]\n\n"


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    """Mean-pooled, L2-normalised Part-A hidden states, through the ``glm_embed`` dynamic batcher."""
    state = _state(request)
    body = await _body(request, EMBED)
    model = state.models.get(EMBED)
    assert isinstance(model, OneShotModel)
    tok = state.service.tok
    inputs = body.get("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or len(inputs) > 256:
        raise APIError(400, "input: expected a string, token ids, or a list of up to 256 of them")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise APIError(400, "encoding_format: 'float' or 'base64'")
    try:
        family = model.family
        rows = [
            model.check(
                ScoreRow("embedding", continuation_ids(tok, x, family) if isinstance(x, str) else [int(t) for t in x])
            )
            for x in inputs
        ]
        for r in rows:
            state.service.check_prompt(r.context)
        mbs = model.spec.max_batch_size
        chunks = [rows[i : i + mbs] for i in range(0, len(rows), mbs)]
        parts = await until_disconnect(request, asyncio.gather(*(model.run(c) for c in chunks)))
    except APIError:
        raise
    except (TypeError, ValueError) as e:
        raise APIError(400, f"input: {e}") from e
    except Exception as e:
        raise translate(e, state, request.url.path) from e
    data = []
    for i, r in enumerate(x for part in parts for x in part):
        vec = r.embedding.numpy().astype(np.float32)
        emb: Any = base64.b64encode(vec.tobytes()).decode() if fmt == "base64" else vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(r.context) for r in rows)
    usage = {"prompt_tokens": n, "total_tokens": n}
    return _json({"object": "list", "data": data, "model": state.config.served_model_name, "usage": usage})
