"""Triton's dynamic batcher for one-shot requests (scoring, logits, embeddings).

A one-shot request is one forward pass, so request-level batching is right for it (unlike generation): requests wait up
to ``max_queue_delay_microseconds`` for others, and one model execution serves them all. The rules are Triton's
(triton-inference-server/core ``src/dynamic_batch_scheduler.cc``; "Dynamic Batcher" in the server's
docs/user_guide/model_configuration.md): batches up to ``max_batch_size`` in arrival order within priority levels,
aiming for ``preferred_batch_size``; a request whose shape differs from the pending batch closes it; ``max_queue_size``
refuses with "Exceeds maximum queue size"; timeouts either reject ("Request timeout expired") or move the request behind
the others (DELAY); ``preserve_ordering`` releases responses in arrival order.

``BatchQueue`` holds all decisions and takes the time as an argument, so tests drive it with a fake clock;
``DynamicBatcher`` runs it on a thread and resolves asyncio futures.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .stats import ModelStats

QUEUE_FULL = "Exceeds maximum queue size"
TIMEOUT = "Request timeout expired"


class BatcherError(RuntimeError):
    """A request the batcher refused or timed out (Triton UNAVAILABLE: HTTP 503)."""


@dataclass
class QueuePolicy:
    """Triton's ``ModelQueuePolicy``; 0 means "no limit" for the timeout and the size."""

    timeout_action: Literal["REJECT", "DELAY"] = "REJECT"
    default_timeout_microseconds: int = 0
    allow_timeout_override: bool = False
    max_queue_size: int = 0


@dataclass
class DynamicBatchingConfig:
    """Triton's ``dynamic_batching`` block plus the model's ``max_batch_size`` (>= 1)."""

    max_batch_size: int = 8
    preferred_batch_size: list[int] = field(default_factory=list)
    max_queue_delay_microseconds: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = field(default_factory=QueuePolicy)
    priority_queue_policy: dict[int, QueuePolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Triton's load-time checks (core model_config_utils.cc)."""
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size: dynamic batching needs >= 1, got {self.max_batch_size}")
        for size in self.preferred_batch_size:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(f"preferred_batch_size: {size} is not in [1, max_batch_size={self.max_batch_size}]")
        if self.max_queue_delay_microseconds < 0:
            raise ValueError("max_queue_delay_microseconds: must be >= 0")
        if self.priority_levels:
            if not 1 <= self.default_priority_level <= self.priority_levels:
                raise ValueError(
                    f"default_priority_level: {self.default_priority_level} is not in [1, {self.priority_levels}]"
                )
            for level in self.priority_queue_policy:
                if not 1 <= level <= self.priority_levels:
                    raise ValueError(f"priority_queue_policy: level {level} is not in [1, {self.priority_levels}]")
        if self.preserve_ordering and self.priority_levels > 1:
            raise ValueError("preserve_ordering: needs priority_levels <= 1")

    def policy(self, level: int) -> QueuePolicy:
        return self.priority_queue_policy.get(level, self.default_queue_policy)

    @property
    def max_preferred(self) -> int:
        return max(self.preferred_batch_size, default=self.max_batch_size)


@dataclass
class BatchItem:
    """One queued request: ``batch_size`` rows of ``payload``; times are in microseconds of the queue's clock."""

    payload: Any
    batch_size: int = 1
    level: int = 0
    shape_key: Hashable = None
    arrival_us: float = 0.0
    deadline_us: float | None = None
    delayed: bool = False
    seq: int = 0
    done: bool = False
    error: str | None = None
    result: Any = None
    on_done: Callable[[BatchItem], None] | None = field(default=None, repr=False)


class BatchQueue:
    """The queue and the batch-forming decision, with no threads and no clock of its own."""

    def __init__(self, config: DynamicBatchingConfig) -> None:
        self.config = config
        self._levels = list(range(1, config.priority_levels + 1)) or [0]
        self._queues: dict[int, list[BatchItem]] = {lv: [] for lv in self._levels}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def level_of(self, priority: int) -> int:
        """Triton: priority 0 (or none) = the default level; levels run 1 (highest) .. priority_levels."""
        if not self.config.priority_levels:
            return 0
        if priority == 0:
            return self.config.default_priority_level
        if not 1 <= priority <= self.config.priority_levels:
            raise ValueError(f"priority: {priority} is not in [1, {self.config.priority_levels}]")
        return priority

    def enqueue(self, item: BatchItem, now_us: float, priority: int = 0, timeout_us: int | None = None) -> None:
        """Queue ``item`` (arriving at ``now_us``); ``BatcherError`` if its level's queue is full."""
        if not 1 <= item.batch_size <= self.config.max_batch_size:
            raise ValueError(
                f"batch size: {item.batch_size} is not in [1, max_batch_size={self.config.max_batch_size}]"
            )
        item.level = self.level_of(priority)
        policy = self.config.policy(item.level)
        queue = self._queues[item.level]
        if policy.max_queue_size and len(queue) >= policy.max_queue_size:
            raise BatcherError(QUEUE_FULL)
        timeout = policy.default_timeout_microseconds
        if timeout_us is not None and policy.allow_timeout_override and (timeout == 0 or 0 < timeout_us < timeout):
            timeout = timeout_us  # a request may only lower its timeout
        item.arrival_us, item.seq = now_us, next(self._seq)
        item.deadline_us = now_us + timeout if timeout else None
        queue.append(item)

    def expire(self, now_us: float) -> list[BatchItem]:
        """Apply timeouts: REJECT removes and returns the items (their ``error`` set), DELAY moves them back."""
        rejected = []
        for level, queue in self._queues.items():
            action = self.config.policy(level).timeout_action
            late = [it for it in queue if it.deadline_us is not None and it.deadline_us <= now_us and not it.delayed]
            for it in late:
                queue.remove(it)
                if action == "REJECT":
                    it.error = TIMEOUT
                    rejected.append(it)
                else:
                    it.delayed = True
            # delayed requests go behind every request that has not timed out, in their own arrival order
            queue.extend(sorted((it for it in late if it.delayed), key=lambda it: it.seq))
        return rejected

    def _ordered(self) -> list[BatchItem]:
        return [it for lv in self._levels for it in self._queues[lv]]

    def next_batch(self, now_us: float) -> tuple[list[BatchItem], float | None]:
        """The batch to execute now (possibly empty) and, if empty, when to decide again (``None`` = on arrival)."""
        c = self.config
        pending: list[BatchItem] = []
        size, marked, send_now = 0, 0, False
        for it in self._ordered():
            if pending and it.shape_key != pending[0].shape_key:
                send_now = True
                break
            if size + it.batch_size > c.max_batch_size:
                send_now = True
                break
            if pending and size + it.batch_size > c.max_preferred:
                marked = marked or size  # the batch cannot grow past the largest preferred size
                break
            pending.append(it)
            size += it.batch_size
            if size in c.preferred_batch_size:
                marked = size
        if not pending:
            return [], None
        oldest = min(it.arrival_us for it in pending)
        delay_over = now_us - oldest >= c.max_queue_delay_microseconds
        if marked and not delay_over:
            return self._take(pending, marked), None
        if send_now or size >= c.max_preferred or delay_over or c.max_queue_delay_microseconds == 0:
            return self._take(pending, size), None
        wake = oldest + c.max_queue_delay_microseconds
        deadlines = [it.deadline_us for it in self._ordered() if it.deadline_us is not None and not it.delayed]
        return [], min([wake, *deadlines])

    def _take(self, pending: list[BatchItem], size: int) -> list[BatchItem]:
        batch, total = [], 0
        for it in pending:
            if total + it.batch_size > size:
                break
            batch.append(it)
            total += it.batch_size
        for it in batch:
            self._queues[it.level].remove(it)
        return batch


class DynamicBatcher:
    """Runs ``execute(payloads) -> results`` (one entry per request) on batches formed by a ``BatchQueue``.

    ``execute`` may return an ``Exception`` for a request that failed alone; an exception raised by it fails
    the whole batch. ``clock`` returns seconds (monotonic).
    """

    def __init__(
        self,
        config: DynamicBatchingConfig,
        execute: Callable[[list[Any]], Sequence[Any]],
        stats: ModelStats | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "batcher",
    ) -> None:
        self.config, self.execute, self.stats, self.clock = config, execute, stats, clock
        self.queue = BatchQueue(config)
        self._cond = threading.Condition()
        self._stop = False
        self._order: list[BatchItem] = []  # arrival order, for preserve_ordering
        self._thread = threading.Thread(target=self._run, name=f"glmkit-{name}", daemon=True)

    def start(self) -> DynamicBatcher:
        self._thread.start()
        return self

    def _now_us(self) -> float:
        return self.clock() * 1e6

    async def submit(
        self,
        payload: Any,
        batch_size: int = 1,
        priority: int = 0,
        timeout_us: int | None = None,
        shape_key: Hashable = None,
    ) -> Any:
        """Queue one request and wait for its result; ``BatcherError`` when refused or timed out."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(it: BatchItem) -> None:
            def resolve() -> None:
                if future.done():
                    return
                if it.error is not None:
                    future.set_exception(BatcherError(it.error))
                elif isinstance(it.result, Exception):
                    future.set_exception(it.result)
                else:
                    future.set_result(it.result)

            loop.call_soon_threadsafe(resolve)

        item = BatchItem(payload, batch_size, shape_key=shape_key, on_done=done)
        with self._cond:
            try:
                self.queue.enqueue(item, self._now_us(), priority, timeout_us)
            except BatcherError:
                if self.stats is not None:
                    self.stats.rejected()
                raise
            if self.config.preserve_ordering:
                self._order.append(item)
            self._publish_pending()
            self._cond.notify()
        return await future

    def pending(self) -> int:
        return len(self.queue)

    def _publish_pending(self) -> None:
        if self.stats is not None:
            self.stats.pending = len(self.queue)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                now = self._now_us()
                expired = self.queue.expire(now)
                batch, wake = self.queue.next_batch(now)
                self._publish_pending()
                if not batch and not expired:
                    timeout = None if wake is None else max(0.001, (wake - now) / 1e6)
                    self._cond.wait(timeout if timeout is not None else 0.1)
                    continue
            for it in expired:
                self._finish(it, now)
            if batch:
                self._run_batch(batch, now)

    def _run_batch(self, batch: list[BatchItem], start_us: float) -> None:
        t0 = time.perf_counter_ns()
        try:
            results = list(self.execute([it.payload for it in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"execute returned {len(results)} results for {len(batch)} requests")
        except Exception as e:  # the batch failed; the batcher keeps serving
            results = [e] * len(batch)
        infer_ns = time.perf_counter_ns() - t0
        if self.stats is not None:
            self.stats.execution(sum(it.batch_size for it in batch), 0, infer_ns, 0)
        for it, res in zip(batch, results, strict=True):
            it.result = res
            self._finish(it, start_us)

    def _finish(self, item: BatchItem, started_us: float) -> None:
        if self.stats is not None:
            ok = item.error is None and not isinstance(item.result, Exception)
            reason = "REJECTED" if item.error else "BACKEND"
            queue_ns = int(max(0.0, started_us - item.arrival_us) * 1000)
            total_ns = int(max(0.0, self._now_us() - item.arrival_us) * 1000)
            self.stats.request_done(ok, queue_ns, total_ns, reason)
        item.done = True
        if not self.config.preserve_ordering:
            self._release(item)
            return
        with self._cond:
            released = []
            while self._order and self._order[0].done:
                released.append(self._order.pop(0))
        for it in released:
            self._release(it)

    @staticmethod
    def _release(item: BatchItem) -> None:
        if item.on_done is not None:
            item.on_done(item)

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
