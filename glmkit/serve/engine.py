"""The serving engine: ``step() = schedule -> execute -> update``, and a background thread that keeps stepping.

``LLMEngine`` is synchronous so tests can drive it step by step; ``AsyncLLMEngine`` runs it on one thread (the
model is not re-entrant and torch releases the GIL while computing) and hands each request's outputs to the
asyncio task that awaits them. An abort is a scheduler state change applied under the lock (vLLM's rule), so a
client that disconnects frees its slot before the next step. Beam search is not iteration-batched: it runs as a
one-shot ``glmkit.generate`` job on its own worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any, TypeVar

import torch

from ..config import SpecialTokens
from ..generate.config import GenerationConfig
from ..generate.engine import resolve_special_tokens
from ..generate.stopping import Decoder
from ..prompts import layout, model_family, model_stop_ids
from .request import Fill, Request, RequestOutput
from .runner import Failures, ModelRunner
from .scheduler import QueueFullError, RunnerOutput, Scheduler, SchedulerConfig, SchedulerOutput
from .stats import ModelStats

log = logging.getLogger("glmkit.serve")
T = TypeVar("T")


class EngineClosedError(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


class LLMEngine:
    """Continuous batching over one GLM. Thread-safe: ``add_request``/``abort`` may run while ``step`` computes."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Decoder | None = None,
        config: SchedulerConfig | None = None,
        special_tokens: SpecialTokens | None = None,
        stats: ModelStats | None = None,
    ) -> None:
        self.config = config or SchedulerConfig()
        self.model, self.tokenizer = model, tokenizer
        self.special = resolve_special_tokens(model, special_tokens, tokenizer)
        self.family = model_family(model)
        # the ids requests are laid out with: a causal family's are a ChatGLM tokenizer's own when it has them
        # (``specials``, with the chat stop ids)
        self.layout_ids: Any = self.special
        if self.family == "chatglm2" and special_tokens is None:
            self.layout_ids = getattr(tokenizer, "specials", None) or self.special
        self.stop_ids = model_stop_ids(model, layout(self.layout_ids, self.family))
        self.scheduler = Scheduler(self.config)
        self.runner = ModelRunner(model, self.config.max_num_seqs, self.config.max_model_len)
        self.stats = stats or ModelStats("llm")
        self._lock = threading.Lock()

    def make_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        config: GenerationConfig | None = None,
        *,
        fill: Fill = "first",
        ignore_eos: bool = False,
        logprobs: int | None = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> Request:
        """Validate and build a request; ``kwargs`` are ``GenerationConfig`` fields. Bad values raise ``ValueError``."""
        return Request(
            request_id,
            prompt_ids,
            GenerationConfig.from_kwargs(config, **kwargs),
            special=self.layout_ids,
            max_sequence_length=self.model.config.max_sequence_length,
            tokenizer=self.tokenizer,
            fill=fill,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            priority=priority,
            device=self.runner.device,
            family=self.family,
            stop_ids=self.stop_ids,
        )

    def check_size(self, num_requests: int) -> None:
        """``ValueError`` when ``num_requests`` queued together could never fit the waiting queue (no retry helps)."""
        size = self.config.max_queue_size
        if size and num_requests > size:
            raise ValueError(
                f"the request holds {num_requests} sequences (prompts x n), more than the server's queue of {size} "
                "(max_queue_size); send them in smaller requests"
            )

    def add_request(self, request: Request) -> None:
        self.add_requests([request])

    def add_requests(self, requests: list[Request]) -> None:
        """Queue ``requests`` all or none: a bad one (``ValueError``) or a full queue (``QueueFullError``) queues
        none of them, so a refused API call leaves nothing behind to run or to count."""
        self.check_size(len(requests))
        for request in requests:
            if request.num_prompt_tokens > self.model.config.n_positions:
                raise ValueError(
                    f"prompt: {request.num_prompt_tokens} tokens (blank included) exceed the model's context of "
                    f"{self.model.config.n_positions} positions"
                )
        with self._lock:
            added: list[str] = []
            try:
                for request in requests:
                    self.scheduler.add_request(request)
                    added.append(request.request_id)
            except Exception as e:
                # under the lock no step has seen them: taking them back leaves the scheduler as it was
                self.scheduler.finish_requests(added, "abort")
                if isinstance(e, QueueFullError):
                    self.stats.rejected()
                raise
            finally:
                self.stats.pending = self.scheduler.num_waiting

    def abort(self, request_ids: list[str], error: str | None = None) -> list[RequestOutput]:
        """Abort requests (client gone, or ``error``); each gets a final output."""
        with self._lock:
            requests = self.scheduler.finish_requests(request_ids, "abort")
        outputs = []
        for request in requests:
            out = request.final_output()
            out.error = error
            self._account(request, out, "BACKEND" if error else "CANCELED")
            outputs.append(out)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_requests()

    def step(self) -> list[RequestOutput]:
        """One model step over every running request (plus the ones admitted now); returns their outputs."""
        with self._lock:
            scheduled = self.scheduler.schedule()
        if not scheduled.decode:
            return []
        start = time.perf_counter_ns()
        sampled, failed = self._execute(scheduled)
        elapsed = time.perf_counter_ns() - start
        failures = [out for rid, error in failed.items() for out in self.abort([rid], error)]
        with self._lock:
            outputs = self.scheduler.update_from_output(scheduled, sampled)
            self.stats.pending, self.stats.running = self.scheduler.num_waiting, self.scheduler.num_running
            self.stats.kv_usage = self.scheduler.num_running / self.config.max_num_seqs
        self.stats.execution(len(scheduled.decode), 0, elapsed, 0, inferences=0)
        by_id = {r.request_id: r for r in scheduled.decode}
        for out in outputs:
            if out.finished:
                self._account(by_id[out.request_id], out, "OTHER")
        return failures + outputs

    def _execute(self, scheduled: SchedulerOutput) -> tuple[RunnerOutput, Failures]:
        """Run a step; a step that raises is rewound and retried on each half of its rows, down to single rows, so
        only the rows that fail alone fail (a row computes what it would alone, so the others' tokens are the same).
        """
        lengths = self.runner.cache.host_lengths()
        try:
            return self.runner.execute(scheduled)
        except Exception as e:
            self.runner.cache.set_lengths(lengths)  # the failed step's cache writes lie past these and are redone
            if len(scheduled.decode) == 1:
                request = scheduled.decode[0]
                log.exception("model step failed for request %s", request.request_id)
                return {}, {request.request_id: f"model execution failed: {type(e).__name__}: {e}"}
            log.warning("model step over %d rows failed (%r); retrying in halves", len(scheduled.decode), e)
        sampled: RunnerOutput = {}
        failed: Failures = {}
        half = len(scheduled.decode) // 2
        for rows in (scheduled.decode[:half], scheduled.decode[half:]):
            part = SchedulerOutput(prefill=[r for r in scheduled.prefill if r in rows], decode=rows)
            s, f = self._execute(part)
            sampled |= s
            failed |= f
        return sampled, failed

    def _account(self, request: Request, out: RequestOutput, failure: str) -> None:
        """Triton request counters and LLM histograms for a request that just finished."""
        now = time.monotonic()
        queued = (request.scheduled_time or now) - request.arrival_time
        ok = out.finish_reason != "abort"
        self.stats.request_done(ok, int(queued * 1e9), int((now - request.arrival_time) * 1e9), failure)
        with self.stats.lock:
            self.stats.inference_count += 1
        self.stats.tokens(request.num_prompt_tokens, request.num_generated)
        if request.first_token_time is not None:
            self.stats.observe_value("ttft_s", request.first_token_time - request.arrival_time)

    def generate_blocking(self, requests: list[Request]) -> dict[str, list[RequestOutput]]:
        """Run ``requests`` to completion on the calling thread (tests, offline use)."""
        for r in requests:
            self.add_request(r)
        outputs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        while self.has_unfinished_requests():
            for out in self.step():
                outputs[out.request_id].append(out)
        return outputs


class AsyncLLMEngine:
    """Steps an ``LLMEngine`` on a background thread; ``generate`` is an async stream of a request's outputs."""

    def __init__(self, engine: LLMEngine, max_jobs: int = 8, threads: int | None = None) -> None:
        self.engine = engine
        self._threads = threads  # the engine thread's torch threads (None: the process default)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="glmkit-engine", daemon=True)
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmkit-job")
        self.max_jobs = max_jobs
        self._job_slots = threading.BoundedSemaphore(max_jobs)

    def start(self) -> AsyncLLMEngine:
        self._thread.start()
        return self

    def _run(self) -> None:
        if self._threads:
            # With libgomp every thread that starts OpenMP work keeps its own team; once the teams' threads
            # outnumber the cores, none of them spins between parallel regions and a GLM-Large step (~120 regions)
            # runs 25-35 % slower. glmkit serve keeps the main thread at one thread, so this is the only team.
            torch.set_num_threads(self._threads)
        while not self._stop:
            if not self.engine.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self._deliver(self.engine.step())
            except Exception:  # keep the loop alive: a failed step already failed its own requests
                log.exception("engine step failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the client's event loop is gone
                pass

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Queue ``request`` and yield its outputs; leaving early (client gone, task cancelled) aborts it."""
        async with aclosing(self.generate_many([request])) as outputs:
            async for out in outputs:
                yield out

    async def generate_many(self, requests: list[Request]) -> AsyncIterator[RequestOutput]:
        """Queue ``requests`` all or none (``LLMEngine.add_requests``) and yield their outputs, interleaved, as the
        steps produce them; leaving early (client gone, task cancelled) aborts the unfinished ones."""
        if not self._accepting:
            raise EngineClosedError("the server is shutting down")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for request in requests:
            self._streams[request.request_id] = (loop, queue)
        try:
            self.engine.add_requests(requests)
        except Exception:
            for request in requests:
                self._streams.pop(request.request_id, None)
            raise
        self._wake.set()
        unfinished = {r.request_id for r in requests}
        try:
            while unfinished:
                outs = [await queue.get()]
                while not queue.empty():
                    outs.append(queue.get_nowait())
                for out in _coalesce(outs):
                    if out.finished:
                        unfinished.discard(out.request_id)
                    yield out
        finally:
            for request in requests:
                self._streams.pop(request.request_id, None)
            if unfinished:
                self.engine.abort(list(unfinished))

    async def run_job(self, fn: Callable[[], T]) -> T:
        """Run a one-shot model job (beam search) on the job thread; ``QueueFullError`` when too many wait."""
        if not self._accepting:
            raise EngineClosedError("the server is shutting down")
        if not self._job_slots.acquire(blocking=False):
            self.engine.stats.rejected()
            raise QueueFullError("Exceeds maximum queue size (one-shot jobs)")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._jobs, _inference(fn))
        finally:
            self._job_slots.release()

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests() or bool(self._streams)

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait up to ``timeout`` s for the running ones; True if all finished."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.busy()

    def shutdown(self) -> None:
        self._accepting = False
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._jobs.shutdown(wait=False, cancel_futures=True)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


def _coalesce(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """A consumer that fell behind gets each request's missed steps of one span as one output (as vLLM does)."""
    joined: list[RequestOutput] = []
    last: dict[str, int] = {}
    for out in outputs:
        i = last.get(out.request_id)
        if i is not None and not joined[i].finished and joined[i].span_index == out.span_index:
            joined[i] = _join(joined[i], out)
        else:
            last[out.request_id] = len(joined)
            joined.append(out)
    return joined


def _join(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one span as one."""
    return dataclasses.replace(b, token_ids=a.token_ids + b.token_ids, logprobs=a.logprobs + b.logprobs)


def _inference(fn: Callable[[], T]) -> Callable[[], T]:
    def run() -> T:
        with torch.inference_mode():
            return fn()

    return run
