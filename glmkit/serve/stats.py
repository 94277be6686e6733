"""Per-model counters in Triton's statistics-extension shape, the one source for ``/stats`` and ``/metrics``.

Triton clients read these exact fields (perf_analyzer fails when one is missing or when ``queue.count`` does not
grow per request), and Triton's Prometheus metrics are the same counters under ``nv_inference_*`` names, so both
endpoints render one ``ModelStats``. Histograms (time to first token, batch sizes) are observed through an
optional callback that the metrics module installs; the engine and batchers do not know Prometheus.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
COMPUTE = ("compute_input", "compute_infer", "compute_output")
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(ns))


@dataclass
class ModelStats:
    """Counters of one model version; thread-safe through ``lock``.

    ``inference_count`` counts batch elements, ``execution_count`` model executions, as Triton does. LLM extras:
    prompt/generated token totals and a running/waiting snapshot set by the engine.
    """

    name: str
    version: str = "1"
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    phases: dict[str, Duration] = field(default_factory=lambda: {p: Duration() for p in PHASES})
    batch: dict[int, dict[str, Duration]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    request_duration_us: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    pending: int = 0
    running: int = 0
    kv_usage: float = 0.0
    observe: Callable[[str, float], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def execution(
        self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int, inferences: int | None = None
    ) -> None:
        """One model execution over a batch of ``batch_size``; it completes ``inferences`` (default: the batch)."""
        with self.lock:
            self.inference_count += batch_size if inferences is None else inferences
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            per_size = self.batch.setdefault(batch_size, {p: Duration() for p in COMPUTE})
            for phase, ns in zip(COMPUTE, (input_ns, infer_ns, output_ns), strict=True):
                self.phases[phase].add(ns)
                per_size[phase].add(ns)
        self._observe("batch_size", batch_size)

    def request_done(self, ok: bool, queue_ns: int, total_ns: int, reason: str = "OTHER") -> None:
        """One request left the server: success or a failure ``reason`` (Triton's REJECTED/CANCELED/BACKEND/OTHER)."""
        with self.lock:
            self.phases["queue"].add(queue_ns)
            if ok:
                self.phases["success"].add(total_ns)
            else:
                self.phases["fail"].add(total_ns)
                self.failures[reason if reason in self.failures else "OTHER"] += 1
            self.request_duration_us += max(0, total_ns) // 1000
        self._observe("request_s", total_ns / 1e9)
        self._observe("queue_s", queue_ns / 1e9)

    def rejected(self) -> None:
        """A request refused before it was queued (queue full): a failure that never waited."""
        self.request_done(False, 0, 0, "REJECTED")

    def tokens(self, prompt: int, generated: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def _observe(self, name: str, value: float) -> None:
        if self.observe is not None:
            self.observe(name, value)

    def observe_value(self, name: str, value: float) -> None:
        """Forward a histogram observation (e.g. ``"ttft_s"``) to the metrics callback, if any."""
        self._observe(name, value)

    def to_triton(self) -> dict[str, Any]:
        """This model's entry of the statistics extension's ``model_stats`` list."""
        with self.lock:

            def d(x: Duration) -> dict[str, int]:
                return {"count": x.count, "ns": x.ns}

            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {p: d(v) for p, v in self.phases.items()},
                "response_stats": {},
                "batch_stats": [
                    {"batch_size": size, **{p: d(v) for p, v in phases.items()}}
                    for size, phases in sorted(self.batch.items())
                ],
                "memory_usage": [],
            }
