"""Fast weight-only matmuls for decoding on CPU: bf16, int8 per channel and int4 per group, on AVX-512 and AVX2.

A decode step reads every weight once per token, so its speed is the memory bandwidth divided by the weight bytes;
the stock PyTorch CPU kernels stay far below that (benchmarks/RESULTS.md, the stock ``F.linear`` rows of
"Quantization"). glmkit's C++ kernels (csrc/linear.cpp, built on first use) stream the weights near the bandwidth;
without them everything still runs on the PyTorch reference.
Batches of decode rows are compute-bound instead: weights packed into panels (``pack_weight``, csrc/packed.cpp)
keep the arithmetic near the CPU's peak while the next panel streams in.
Training uses their attention and dropout (training.py). The kernels sit above the model: they import model.py's
modules to subclass them and swap them in, and model.py imports nothing from here.
"""

from .build import isa, unavailable_reason
from .modules import FastLinear, FastTiedHead, pack_linear, replace_linear
from .ops import (
    attention,
    available,
    gelu,
    linear,
    linear_bf16,
    linear_int4,
    linear_int4x16,
    linear_int8,
    linear_packed,
    pack_weight,
    rotary,
    unpack_weight,
)

__all__ = [
    "FastLinear",
    "FastTiedHead",
    "attention",
    "available",
    "gelu",
    "isa",
    "linear",
    "linear_bf16",
    "linear_int4",
    "linear_int4x16",
    "linear_int8",
    "linear_packed",
    "pack_linear",
    "pack_weight",
    "replace_linear",
    "rotary",
    "unavailable_reason",
    "unpack_weight",
]
