"""The playground ``glmkit serve`` shows at ``/``: static pages (glmkit/serve/playground/, no build step, nothing
from a CDN) that talk to the server's own APIs — OpenAI streaming, ``/v1/infill``, KServe v2 — and to one route of
their own, ``POST /playground/layout``: a text's GLM layout (Part A, Part B, 2D positions, the attention mask, with
GPT's and BERT's masks beside it), laid out by ``glmkit explain`` through masks.py like everything else.

The pages are public (the page asks for the API key and sends it on every API call); the layout route is an API
and needs the key like the others. Every page answer carries a content security policy that allows the page's own
scripts, styles and same-origin requests only, so nothing a user types can run as a script even if it reached the
DOM as HTML (the scripts write user text with ``textContent`` only). ``--no-playground`` leaves all of it out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from ..explain import explain
from ..masks import prefix_lm_mask, sample_mask
from .http_common import APIError, ServerState
from .served import parse_json

STATIC = Path(__file__).parent / "playground"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MAX_SPAN_LENGTH = 64


def pages() -> dict[str, Path]:
    """URL path -> file: ``/`` is index.html, every other file is ``/playground/<name>``."""
    files = sorted(p for p in STATIC.iterdir() if p.suffix in TYPES)
    return {("/" if p.name == "index.html" else f"/playground/{p.name}"): p for p in files}


PAGES = pages()
PUBLIC_PATHS = frozenset(PAGES)  # served without the API key and while the model loads


class LayoutRequest(BaseModel):
    text: str = Field(description="text with [MASK], [sMASK] or [gMASK] blanks; [MASK]{span} says what fills one")
    span_length: int | None = Field(None, ge=1, le=MAX_SPAN_LENGTH, description="placeholders per unfilled blank")


class LayoutResponse(BaseModel):
    family: str
    causal: bool = Field(description="a causal LM's prompt and answer: no Part A / Part B")
    tokens: list[str] = Field(description="each token as the tokenizer names it; ▢ a placeholder")
    ids: list[int]
    position_ids: list[int]
    block_position_ids: list[int]
    sep: int = Field(description="Part A's length: Part A is tokens[:sep], Part B the rest")
    blank_positions: list[int]
    masks: dict[str, list[str]] = Field(description="glm, gpt, bert: one string of 0/1 per row (row attends to column)")


ROUTES: dict[str, tuple[str, str, Any, dict[int, Any]]] = {
    path: ("get", f"The playground ({file.name})", None, {200: TYPES[file.suffix].split(";")[0]})
    for path, file in PAGES.items()
}
ROUTES["/playground/layout"] = ("post", "The GLM layout of a text (playground)", LayoutRequest, {200: LayoutResponse})
MODELS = (LayoutRequest, LayoutResponse)

router = APIRouter()


def _page(file: Path) -> Any:
    body, media = file.read_bytes(), TYPES[file.suffix]

    async def page() -> Response:
        return Response(body, media_type=media, headers=HEADERS)

    return page


for _path, _file in PAGES.items():
    router.add_api_route(_path, _page(_file), methods=["GET"], include_in_schema=False)


def _rows(mask: torch.Tensor) -> list[str]:
    return ["".join("1" if x else "0" for x in row) for row in mask.tolist()]


@router.post("/playground/layout", include_in_schema=False)
async def layout(request: Request) -> Response:
    state: ServerState = request.app.state.glmkit
    try:
        body = parse_json(await request.body())
    except ValueError as e:
        raise APIError(400, f"request body: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    text, span_length = body.get("text"), body.get("span_length", 2)
    if not isinstance(text, str) or not text.strip():
        raise APIError(400, "text: expected a non-empty string with [MASK], [sMASK] or [gMASK] blanks")
    if isinstance(span_length, bool) or not isinstance(span_length, int) or not 1 <= span_length <= MAX_SPAN_LENGTH:
        raise APIError(400, f"span_length: expected an int in [1, {MAX_SPAN_LENGTH}]")
    service = state.service
    try:
        ex = explain(text, service.tok, span_length, family=service.family)
    except ValueError as e:
        raise APIError(400, str(e)) from e
    s, context = ex.sample, service.model.config.n_positions
    # positions (and block positions) index tables of ``context`` rows
    needed = len(s) if ex.causal else max(s.sep, max(s.block_position_ids) + 1)
    if needed > context:
        what = "tokens" if ex.causal else "tokens in Part A" if s.sep > context else "positions in one span"
        raise APIError(400, f"text: {needed} {what} exceed the model's context of {context} positions")
    n = len(s)
    masks = {"glm": sample_mask(s), "gpt": prefix_lm_mask(0, n)[0, 0], "bert": prefix_lm_mask(n, n)[0, 0]}
    answer = {
        "family": service.family,
        "causal": ex.causal,
        "tokens": ex.labels,
        "ids": s.tokens,
        "position_ids": s.position_ids,
        "block_position_ids": s.block_position_ids,
        "sep": s.sep,
        "blank_positions": s.blank_positions,
        "masks": {name: _rows(m) for name, m in masks.items()},
    }
    return Response(LayoutResponse(**answer).model_dump_json(), media_type="application/json")
