"""Ceilings measured in the same run as the thing being benchmarked: matmul peak and memory bandwidth."""

from __future__ import annotations

import time

import torch


def matmul_peak_gflops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def memory_bandwidth_gbs(mib: int = 512, seconds: float = 3.0) -> float:
    """Read bandwidth: fp32 ``sum`` over a buffer far larger than the caches (best of several passes)."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def select_isa(isa: str | None) -> None:
    """Run glmkit's kernels built for ``isa`` (``GLMKIT_ISA``); call before the kernels load."""
    import os

    if isa:
        os.environ["GLMKIT_ISA"] = isa


def machine() -> str:
    """The CPU model and the instruction set glmkit's kernels run on, for every reported figure."""
    import platform
    from pathlib import Path

    from glmkit import kernels

    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    isa = kernels.isa() or f"reference ({kernels.unavailable_reason()})"
    return f"{cpu}, {torch.get_num_threads()} threads, kernels: {isa}"


class Clock:
    """A transformers-style streamer that timestamps every generated token (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.start, self.stamps = time.perf_counter(), []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        self.stamps = self.stamps[1:]

    def rates(self) -> tuple[float, float]:
        """(end-to-end tokens/s, decode tokens/s after the first token)."""
        n = len(self.stamps)
        return n / (self.stamps[-1] - self.start), (n - 1) / (self.stamps[-1] - self.stamps[0])
