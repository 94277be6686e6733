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
