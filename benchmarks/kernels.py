"""Weight-only GEMV throughput on this CPU: glmkit's kernels against the stock PyTorch ops, per weight dtype.

The weights of one GLM-Large decode step (24 layers x qkv 1024->3072, proj 1024->1024, fc 1024->4096,
proj 4096->1024; random values, ~600 MB in bf16, far beyond the caches) are multiplied by ``--rows`` activation
rows, each variant in turn, interleaved over ``--rounds`` rounds (best round per variant), beside the fp32 ``sum``
read bandwidth measured in the same rounds. GB/s counts the weight bytes (scales included) read per pass.

    python -m benchmarks.kernels [--rows 1] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from glmkit import kernels
from glmkit.kernels.reference import unpack_int4
from glmkit.quantize import quantize_int4, quantize_int8

SHAPES = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]  # (out, in) of one layer's linears
LAYERS = 24


def variants(rows: int) -> dict[str, tuple[list[Callable[[], object]], int]]:
    """name -> (one call per matrix, weight bytes read per pass)."""
    torch.manual_seed(0)
    mats = [torch.randn(n, k) * 0.02 for _ in range(LAYERS) for n, k in SHAPES]
    xs = {k: torch.randn(rows, k) for _, k in SHAPES}
    xb = {k: x.bfloat16() for k, x in xs.items()}
    out: dict[str, tuple[list, int]] = {}

    def add(name: str, calls: list, nbytes: int) -> None:
        out[name] = (calls, nbytes)

    add("fp32 F.linear", [lambda w=w: F.linear(xs[w.shape[1]], w) for w in mats], sum(w.nbytes for w in mats))
    wb = [w.bfloat16() for w in mats]
    nb = sum(w.nbytes for w in wb)
    add("bf16 F.linear", [lambda w=w: F.linear(xb[w.shape[1]], w) for w in wb], nb)
    add("bf16 glmkit", [lambda w=w: kernels.linear_bf16(xb[w.shape[1]], w) for w in wb], nb)
    q8 = [quantize_int8(w) for w in mats]
    nb = sum(q.nbytes + s.nbytes for q, s in q8)
    add(
        "int8 _weight_int8pack_mm",
        [lambda q=q, s=s: torch._weight_int8pack_mm(xb[q.shape[1]], q, s) for q, s in q8],
        nb,
    )
    add("int8 glmkit", [lambda q=q, s=s: kernels.linear_int8(xb[q.shape[1]], q, s) for q, s in q8], nb)
    for g in (32, 128):
        q4 = [quantize_int4(w, g) for w in mats]
        nb = sum(p.nbytes + s.nbytes for p, s in q4)
        stock = []
        for p, s in q4:  # the stock op's own packing of the same nibbles, scales and zero points [K/g, N, 2]
            packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(p).int(), 1)
            sz = torch.stack([s.t().bfloat16(), torch.zeros_like(s.t()).bfloat16()], dim=-1).contiguous()
            stock.append(
                lambda p=packed, sz=sz, k=p.shape[1] * 2, g=g: torch._weight_int4pack_mm_for_cpu(xb[k], p, g, sz)
            )
        add(f"int4 g{g} _weight_int4pack_mm", stock, nb)
        add(
            f"int4 g{g} glmkit",
            [lambda p=p, s=s, g=g: kernels.linear_int4(xb[p.shape[1] * 2], p, s, g) for p, s in q4],
            nb,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1, help="activation rows (1 = single-stream decode)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(f"glmkit kernels unavailable: {kernels.unavailable_reason()}")
    table = variants(args.rows)
    buf = torch.ones(512 * 2**20 // 4)
    best = {name: float("inf") for name in table}
    bandwidth = 0.0
    with torch.inference_mode():
        for calls, _ in table.values():
            for c in calls:
                c()
        for _ in range(args.rounds):
            t = time.perf_counter()
            buf.sum()
            bandwidth = max(bandwidth, buf.nbytes / (time.perf_counter() - t) / 1e9)
            for name, (calls, _) in table.items():
                t = time.perf_counter()
                for c in calls:
                    c()
                best[name] = min(best[name], time.perf_counter() - t)
    print(f"{args.threads} thread(s), {args.rows} row(s); fp32 sum read bandwidth {bandwidth:.1f} GB/s (best round)")
    for name, (_, nbytes) in table.items():
        gbs = nbytes / best[name] / 1e9
        print(f"{name:30s} {best[name] * 1e3:8.2f} ms {nbytes / 1e6:6.0f} MB {gbs:6.1f} GB/s {gbs / bandwidth:5.0%}")


if __name__ == "__main__":
    main()
