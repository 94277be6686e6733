"""Iteration-level (continuous) batching: which requests take part in the next model step.

Request-level batching keeps a batch until its longest member finishes, so short requests wait for long ones and
new arrivals wait for the whole batch. Here, as in Orca and vLLM, the decision is made before every step: all
running requests decode one token, and waiting requests join as soon as a KV slot and the token budget allow
(they are prefilled in the same step and decode their ``<sop>`` with the others). A finished or aborted request
frees its slot at once. The scheduler is pure Python — slots are integers, the model never appears — so it is
tested with a fake runner.

Policy: FCFS within priority levels (lower ``priority`` first), decode before prefill, no preemption (a slot holds
the whole sequence, so a request that fits when admitted always finishes). Admission control: a request that can
never fit is refused (``ValueError``), one that finds the waiting queue full is refused with ``QueueFullError``.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

from .request import FinishReason, Request, RequestOutput, TokenLogprob


class QueueFullError(RuntimeError):
    """The waiting queue is full: the server should answer 503/429 and the client retry later."""


@dataclass
class SchedulerConfig:
    """Batching limits.

    Attributes:
        max_num_seqs: sequences decoding together = KV-cache slots (rows of the pool cache).
        max_num_batched_tokens: tokens one model step may process (prefills + one per decoding sequence).
        max_model_len: cache rows per slot: prompt plus generated tokens of one request.
        max_queue_size: requests waiting for a slot; 0 = unbounded.
    """

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int = 512
    max_queue_size: int = 256

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not isinstance(self.max_queue_size, int) or self.max_queue_size < 0:
            raise ValueError(f"max_queue_size: expected an int >= 0, got {self.max_queue_size!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens: {self.max_num_batched_tokens} cannot decode max_num_seqs="
                f"{self.max_num_seqs} sequences in one step"
            )


@dataclass
class SchedulerOutput:
    """One step: ``prefill`` requests get their Part A encoded into their slot first; then every request of
    ``decode`` (ordered by slot) feeds one token."""

    prefill: list[Request] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    num_tokens: int = 0


# what the runner returns per request that sampled this step
RunnerOutput = dict[str, tuple[int, TokenLogprob | None]]


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._waiting: list[tuple[int, int, Request]] = []  # heap of (priority, arrival number, request)
        self._arrivals = itertools.count()
        self.running: dict[str, Request] = {}
        self._free_slots = list(range(config.max_num_seqs))
        self._ids: dict[str, Request] = {}
        self.num_waiting = 0

    def add_request(self, request: Request) -> None:
        """Queue ``request``; ``ValueError`` if it can never run, ``QueueFullError`` if the queue is full."""
        c = self.config
        if request.request_id in self._ids:
            raise ValueError(f"request_id: {request.request_id!r} is already queued or running")
        if request.kv_tokens() > c.max_model_len:
            raise ValueError(
                f"prompt + max_tokens: the request needs {request.kv_tokens()} cache rows "
                f"({request.num_prompt_tokens} prompt tokens), more than max_model_len={c.max_model_len}"
            )
        if request.num_prompt_tokens + 1 > c.max_num_batched_tokens:
            raise ValueError(
                f"prompt: {request.num_prompt_tokens} tokens exceed max_num_batched_tokens={c.max_num_batched_tokens}"
            )
        if c.max_queue_size and self.num_waiting >= c.max_queue_size:
            raise QueueFullError(f"Exceeds maximum queue size ({c.max_queue_size} requests waiting)")
        heapq.heappush(self._waiting, (request.priority, next(self._arrivals), request))
        self._ids[request.request_id] = request
        self.num_waiting += 1

    def has_requests(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def schedule(self) -> SchedulerOutput:
        """Decode every running request, then admit waiting ones while slots and the token budget last.

        The scheduling decision is made at the iteration level: one call per model step.
        """
        out = SchedulerOutput(decode=list(self.running.values()))
        budget = self.config.max_num_batched_tokens - len(out.decode)
        while self._waiting and self._free_slots:
            request = self._waiting[0][2]
            if request.finished:  # aborted while waiting
                heapq.heappop(self._waiting)
                continue
            cost = request.num_prompt_tokens + 1
            if cost > budget:
                break  # head of line waits for the next step: no overtaking within the order
            heapq.heappop(self._waiting)
            self.num_waiting -= 1
            request.slot = heapq.heappop(self._free_slots)
            request.status = "running"
            request.scheduled_time = time.monotonic()
            self.running[request.request_id] = request
            out.prefill.append(request)
            out.decode.append(request)
            budget -= cost
        out.decode.sort(key=lambda r: r.slot)
        out.num_tokens = self.config.max_num_batched_tokens - budget
        return out

    def update_from_output(self, scheduled: SchedulerOutput, sampled: RunnerOutput) -> list[RequestOutput]:
        """Advance every request of the step by its fed input and sampled token; free finished requests."""
        outputs = []
        for request in scheduled.decode:
            if request.finished:  # aborted during the step
                continue
            request.input_done()
            if request.request_id in sampled:
                token, logprob = sampled[request.request_id]
                outputs.append(request.append_token(token, logprob))
                if request.finished:
                    self._release(request)
        return outputs

    def finish_requests(self, request_ids: list[str], reason: FinishReason = "abort") -> list[Request]:
        """Finish (abort) requests wherever they are; their slots are free for the next step."""
        finished = []
        for rid in request_ids:
            request = self._ids.get(rid)
            if request is None or request.finished:
                continue
            if request.status == "waiting":
                self.num_waiting -= 1  # the heap entry is dropped lazily by schedule()
            request.finish(reason)
            self._release(request)
            finished.append(request)
        return finished

    def _release(self, request: Request) -> None:
        self._ids.pop(request.request_id, None)
        if self.running.pop(request.request_id, None) is not None and request.slot is not None:
            heapq.heappush(self._free_slots, request.slot)
