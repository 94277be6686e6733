"""Error models for comparing the kernels with exact math: how far a result may lie from ``x @ w.T`` given how the
kernels round their inputs (glmkit/kernels/reference.py: bf16 or 16-bit fixed point per row), sum (fp32) and round
their outputs."""

import torch

from glmkit.kernels.layout import FIXED16_MAX

BF16_UNIT = 2**-8  # bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of it
FP32_UNIT = 2**-24


def activation_error_bound(
    x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype = torch.float32, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per output: the most ``x @ w.T (+ bias)`` moves when each ``x`` is rounded to bf16 or to 16-bit fixed point
    per row (whichever is coarser there), the ``K`` products (and the bias) are summed in fp32 in any order, and the
    result is rounded to ``out_dtype``."""
    x, w = x.float(), w.float()
    K = x.shape[-1]
    delta = x.abs() * BF16_UNIT + x.abs().amax(dim=-1, keepdim=True) / (2 * FIXED16_MAX)
    magnitude = x.abs() @ w.abs().T
    if bias is not None:
        magnitude = magnitude + bias.float().abs()
    bound = delta @ w.abs().T + (K + 1) * FP32_UNIT * magnitude * 2
    if out_dtype == torch.bfloat16:
        bound = bound + (magnitude + bound) * BF16_UNIT
    return bound


def assert_within(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    err = (y.float() - ref.float()).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (err.flatten()[worst].item(), bound.flatten()[worst].item())
