"""What the HTTP front ends call: text generation over the engine, and the Triton models bound to their engines.

``GenerationService`` turns a prompt and ``SamplingParams`` into streamed text choices: ``n`` choices are ``n``
engine requests decoding side by side, beam search is a one-shot ``generate`` job, and text comes out through
``IncrementalText`` so a streamed answer equals the non-streamed one. Both the OpenAI and the Triton front ends
use it, so they share one engine and one behaviour. ``LLMModel`` and ``OneShotModel`` give the Triton specs
(specs.py) their tensors-in, tensors-out behaviour. An unloaded model (repository.py) keeps its spec and statistics
and drops its engine or batcher; its requests get ``ModelUnloadedError``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..generate import fill_blank_ids, generate
from ..masks import find_blanks
from ..prompts import continuation_ids, layout
from .batcher import DynamicBatcher
from .engine import AsyncLLMEngine
from .request import Fill, Request, RequestOutput, TokenLogprob
from .sampling import Limits, SamplingParams
from .scoring import Kind, Scorer, ScoreResult, ScoreRow
from .specs import EMBED, LOGITS, SCORE, ModelSpec
from .stats import ModelStats
from .text import IncrementalText

_ids = itertools.count()


class ModelUnloadedError(LookupError):
    """The model was unloaded (Triton's model-repository extension): 404, as Triton answers such a request."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Request for unknown model: '{name}' has no available versions")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> Any:
    """A request body (or a JSON parameter) as Python objects; ``ValueError`` naming the problem for what no handler
    could take: not JSON, not UTF-8, nested deeper than the parser recurses, or a string with a lone surrogate
    (``"\\ud800"`` is valid JSON but not Unicode text: tokenizers and encoders refuse it)."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON: {e}") from e
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(raw):  # a surrogate pair decodes to one character; only a lone half survives
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from None
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
    return obj


@dataclass
class Delta:
    """New text of choice ``index``; the last delta of a choice has ``finish_reason`` ("stop", "length", "abort")."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    spans: list[list[int]] = field(default_factory=list)
    error: str | None = None
    span_index: int = -1  # the blank whose span ``text`` belongs to (with ``every_span``; -1: the last blank)


class _Choice:
    """One engine request's text: tokens of earlier blanks are context, not answer, unless ``every_span`` (the
    streamed /v1/infill shows every blank filling); the stop strings end the last blank's answer only."""

    def __init__(self, index: int, request: Request, params: SamplingParams, tok: Any, every_span: bool) -> None:
        self.index, self.request, self.tok, self.every_span = index, request, tok, every_span
        self.text = IncrementalText(tok, params.stop, params.include_stop_str_in_output)
        self.last_span = request.num_spans - 1
        self.earlier: IncrementalText | None = None  # the earlier blank being streamed (``every_span``)
        self.earlier_index = -1

    def delta(self, out: RequestOutput) -> Delta | None:
        mine = out.span_index == self.last_span
        if self.every_span and not mine and not out.finished:
            # an earlier blank's text as it grows; bytes of a character cut at a span's end wait for the last
            # delta, whose ``spans`` hold every span whole
            if self.earlier is None or out.span_index != self.earlier_index:
                self.earlier, self.earlier_index = IncrementalText(self.tok), out.span_index
            text = self.earlier.push(out.token_ids)
            return Delta(self.index, text, span_index=out.span_index) if text else None
        delta = Delta(self.index, self.text.push(out.token_ids if mine else [], final=out.finished))
        if mine:
            delta.token_ids, delta.logprobs = list(out.token_ids), list(out.logprobs)
        if out.finished:
            delta.finish_reason = "stop" if self.text.stopped else _reason(out.finish_reason)
            delta.spans = out.spans
            delta.error = out.error
        return delta if delta.text or delta.token_ids or delta.finish_reason else None


def _reason(engine_reason: str | None) -> str:
    return {"stop": "stop", "stop_string": "stop", "abort": "abort"}.get(engine_reason or "", "length")


class GenerationService:
    def __init__(self, engine: AsyncLLMEngine, tokenizer: Any, limits: Limits) -> None:
        self.tok, self.limits = tokenizer, limits
        self.attach(engine)

    def attach(self, engine: AsyncLLMEngine | None) -> None:
        """Generate on ``engine``; ``None`` (``llm`` unloaded) lets go of the engine, its KV pool and the model, while
        the tokenizer and the vocabulary size stay for the requests that only check prompts."""
        self._engine = engine
        if engine is not None:
            self.vocab_size = engine.engine.model.config.vocab_size

    @property
    def engine(self) -> AsyncLLMEngine:
        if self._engine is None:
            raise ModelUnloadedError("llm")
        return self._engine

    @property
    def special(self) -> Any:
        return self.engine.engine.special

    @property
    def model(self) -> Any:
        return self.engine.engine.model

    @property
    def family(self) -> str:
        """The served model's prompt family (``glmkit.prompts.model_family``)."""
        return self.engine.engine.family

    def check_prompt(self, ids: list[int]) -> None:
        if len(ids) > self.limits.max_prompt_tokens:
            raise ValueError(f"prompt: {len(ids)} tokens exceed the limit of {self.limits.max_prompt_tokens}")
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")

    def check_size(self, num_prompts: int, params: SamplingParams) -> None:
        """``ValueError`` when ``num_prompts`` prompts of ``params.n`` choices could never be queued at once: a
        request larger than the queue is a client error, not backpressure to retry."""
        if params.beams > 1:
            if num_prompts > self.engine.max_jobs:
                raise ValueError(
                    f"prompt: {num_prompts} prompts with beam search exceed the server's {self.engine.max_jobs} "
                    "one-shot jobs; send them in smaller requests"
                )
        else:
            self.engine.engine.check_size(num_prompts * params.n)

    async def stream(
        self,
        prompts: list[tuple[list[int], Fill]],
        params: SamplingParams,
        *,
        priority: int = 0,
        every_span: bool = False,
    ) -> AsyncIterator[Delta]:
        """Deltas of every prompt's ``params.n`` choices, interleaved (choice ``i`` of prompt ``p`` has index
        ``p * n + i``); each answer is the span of its prompt's last blank (``every_span``: earlier blanks' spans
        stream too, each delta naming its blank).

        The call is validated whole and queued whole before the first delta, or refused with nothing queued.
        """
        self.check_size(len(prompts), params)
        for ids, _ in prompts:
            self.check_prompt(ids)
        if params.beams > 1:
            for d in await self._all_beams(prompts, params):
                yield d
            return
        vocab = self.vocab_size
        choices = {}
        for p, (ids, fill) in enumerate(prompts):
            for i in range(params.n):
                request = self.engine.engine.make_request(
                    f"gen-{next(_ids)}",
                    ids,
                    params.generation_config(self.special, i, vocab, self.engine.engine.stop_ids),
                    fill=fill,
                    ignore_eos=params.ignore_eos,
                    logprobs=params.logprobs,
                    priority=priority,
                )
                choices[request.request_id] = _Choice(p * params.n + i, request, params, self.tok, every_span)
        requests = [c.request for c in choices.values()]
        async with aclosing(self.engine.generate_many(requests)) as outputs:
            async for out in outputs:
                delta = choices[out.request_id].delta(out)
                if delta is not None:
                    yield delta

    async def _all_beams(self, prompts: list[tuple[list[int], Fill]], params: SamplingParams) -> list[Delta]:
        jobs = [self._beams(ids, params) for ids, _ in prompts]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        deltas = []
        for p, result in enumerate(results):
            if isinstance(result, BaseException):
                raise result
            for d in result:
                d.index += p * params.n
                deltas.append(d)
        return deltas

    async def _beams(self, prompt_ids: list[int], params: SamplingParams) -> list[Delta]:
        if params.logprobs is not None:
            raise ValueError("logprobs: not available with beam search")
        model = self.model  # the job thread must not look it up: an unload may drop it meanwhile
        engine = self.engine.engine
        config = params.generation_config(self.special, 0, self.vocab_size, engine.stop_ids)
        blanks = find_blanks(prompt_ids, layout(self.special, engine.family).blank_ids())
        if len(blanks) > 1 and params.n > 1:
            raise ValueError("n: beam search over several blanks returns one sequence")
        # the engine's layout ids: a ChatGLM tokenizer's own for a causal family (with its chat stop ids)
        kw = dict(generation_config=config, special_tokens=engine.layout_ids, tokenizer=self.tok)
        if len(blanks) > 1:
            res = await self.engine.run_job(lambda: fill_blank_ids(model, prompt_ids, **kw))
            seqs, reasons, spans = [res.spans[-1]], res.finish_reasons[-1:], [res.spans]
        else:
            out = await self.engine.run_job(lambda: generate(model, [prompt_ids], **kw))
            seqs, reasons = out.new_tokens, out.finish_reasons
            spans = [[s[:-1] if r == "stop" else s] for s, r in zip(seqs, reasons, strict=True)]
        deltas = []
        for i, (seq, reason) in enumerate(zip(seqs, reasons, strict=True)):
            text = IncrementalText(self.tok, params.stop, params.include_stop_str_in_output)
            d = Delta(
                i, text.push(seq, final=True), list(seq), finish_reason="stop" if text.stopped else _reason(reason)
            )
            d.spans = spans[i]
            deltas.append(d)
        return deltas


def _strings(name: str, arr: np.ndarray) -> list[str]:
    out = []
    for x in arr.reshape(-1):
        try:
            out.append(x.decode("utf-8") if isinstance(x, bytes) else str(x))
        except UnicodeDecodeError as e:
            raise ValueError(f"input '{name}': invalid UTF-8 ({e.reason})") from e
    return out


def _scalar(inputs: dict[str, np.ndarray], name: str, default: Any) -> Any:
    arr = inputs.get(name)
    if arr is None or arr.size == 0:
        return default
    return arr.reshape(-1)[0]


class LLMModel:
    """``llm``: vLLM-backend semantics — the first response carries the prompt unless ``exclude_input_in_output``,
    ``stream`` sends deltas, otherwise one response with the whole text."""

    def __init__(self, spec: ModelSpec, service: GenerationService) -> None:
        self.spec, self.service, self.stats = spec, service, service.engine.engine.stats
        self.ready = True

    async def generate(self, inputs: dict[str, np.ndarray], params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        prompt = _strings("text_input", inputs["text_input"])
        if len(prompt) != 1:
            raise ValueError(f"text_input: expected one prompt, got {len(prompt)}")
        stream = bool(_scalar(inputs, "stream", False))
        exclude = bool(_scalar(inputs, "exclude_input_in_output", False))
        raw = _scalar(inputs, "sampling_parameters", None)
        if raw is not None:
            try:
                sampling = parse_json(raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "surrogatepass"))
            except ValueError as e:
                raise ValueError(f"sampling_parameters: {e}") from e
            if not isinstance(sampling, dict):
                raise ValueError("sampling_parameters: not a JSON object")
        else:
            sampling = params
        sp = SamplingParams.from_dict(sampling, self.service.limits)
        if sp.n != 1:
            raise ValueError("n: the llm model returns one sequence per request")
        priority = params.get("priority", 0)
        ids = continuation_ids(self.service.tok, prompt[0], self.service.family)
        head = "" if exclude else prompt[0]
        text, reason = head, None
        async for d in self.service.stream([(ids, "all")], sp, priority=priority if isinstance(priority, int) else 0):
            if d.error:
                raise RuntimeError(d.error)
            if stream:
                if d.text or d.finish_reason:
                    yield self._tensors(head + d.text, d.finish_reason or "")
                    head = ""
            else:
                text += d.text
            reason = d.finish_reason or reason
        if not stream:
            yield self._tensors(text, reason or "")

    @staticmethod
    def _tensors(text: str, finish_reason: str) -> dict[str, Any]:
        return {
            "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
            "finish_reason": np.array([finish_reason.encode("utf-8")], dtype=np.object_),
        }


class OneShotModel:
    """``glm_score`` / ``glm_embed`` / ``glm_logits``: rows of a request go through the dynamic batcher together.

    Inside Triton (export.py) Triton batches instead: ``rows`` and ``outputs`` are used around the ``Scorer``.
    """

    KINDS: dict[str, Kind] = {SCORE: "loglikelihood", EMBED: "embedding", LOGITS: "logits"}

    def __init__(
        self,
        spec: ModelSpec,
        scorer: Scorer | None,
        tokenizer: Any,
        batcher: DynamicBatcher | None = None,
        stats: ModelStats | None = None,
    ) -> None:
        self.spec, self.scorer, self.tok = spec, scorer, tokenizer
        self.batcher, self.stats = batcher, stats or ModelStats(spec.name)
        self.kind = self.KINDS[spec.name]
        self.ready = scorer is not None
        self.active = 0  # requests between ``run`` and their results: what an unload waits for

    def check(self, row: ScoreRow) -> ScoreRow:
        if self.scorer is None:
            raise ModelUnloadedError(self.spec.name)
        return self.scorer.check(row)

    @property
    def family(self) -> str:
        """The model's prompt family, which lays out a text row (``glmkit.prompts.model_family``)."""
        if self.scorer is None:
            raise ModelUnloadedError(self.spec.name)
        return self.scorer.family

    def rows(self, inputs: dict[str, np.ndarray]) -> list[ScoreRow]:
        texts = _strings("text_input", inputs["text_input"])
        conts = _strings("continuation", inputs["continuation"]) if "continuation" in inputs else [""] * len(texts)
        if len(conts) != len(texts):
            raise ValueError("continuation: one per text_input row")
        family = self.family
        return [
            self.check(ScoreRow(self.kind, continuation_ids(self.tok, t, family), self.tok.encode(c) if c else []))
            for t, c in zip(texts, conts, strict=True)
        ]

    def outputs(self, results: list[ScoreResult]) -> dict[str, np.ndarray]:
        """Output tensors of one request's rows (a leading batch dimension when the model batches)."""
        shape = (len(results), 1) if self.spec.max_batch_size else (1,)
        if self.kind == "loglikelihood":
            return {
                "logprob": np.array([r.logprob for r in results], dtype=np.float32).reshape(shape),
                "is_greedy": np.array([r.is_greedy for r in results], dtype=np.bool_).reshape(shape),
                "num_tokens": np.array([len(r.token_logprobs) for r in results], dtype=np.int32).reshape(shape),
            }
        vectors = [(r.embedding if self.kind == "embedding" else r.logits).numpy() for r in results]
        stacked = np.stack(vectors) if self.spec.max_batch_size else vectors[0]
        return {"embedding" if self.kind == "embedding" else "logits": stacked}

    async def run(self, rows: list[ScoreRow], **schedule: Any) -> list[ScoreResult]:
        """``rows`` through the dynamic batcher as one request (``schedule``: ``DynamicBatcher.submit``'s)."""
        batcher = self.batcher
        if batcher is None:
            raise ModelUnloadedError(self.spec.name)
        self.active += 1
        try:
            return await batcher.submit(rows, batch_size=len(rows), **schedule)
        finally:
            self.active -= 1

    async def infer(self, inputs: dict[str, np.ndarray], params: dict[str, Any]) -> dict[str, np.ndarray]:
        rows = self.rows(inputs)
        return self.outputs(await self.run(rows, **schedule_params(params)))


def schedule_params(params: dict[str, Any]) -> dict[str, Any]:
    """Triton's schedule-policy parameters: ``priority`` and ``timeout`` (µs)."""
    out: dict[str, Any] = {}
    for key, target in (("priority", "priority"), ("timeout", "timeout_us")):
        value = params.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key}: expected a non-negative int, got {value!r}")
            out[target] = value
    return out
