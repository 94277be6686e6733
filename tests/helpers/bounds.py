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


# Comparisons of two evaluations of the same weights that round differently (the order of their fp32 sums, where
# they round to bf16): neither is exact, so both are measured against an evaluation of the same weights in higher
# precision. Each result's rounding error is a sum of many roundings, each at most the unit roundoff of its value and
# as likely up as down whatever the order of the sums, so the other evaluation's error is as large as the
# reference's; REROUNDED_SLACK covers how much the largest one varies between two orders (measured: up to 1.6 for a
# 32-value gradient under inductor, 1.0 for the fused decode step; test_chatglm2_fused.py allows 1.5).
REROUNDED_SLACK = 2.0


def rounding_error(y: torch.Tensor, exact: torch.Tensor, unit: float) -> float:
    """How far rounding moved ``y`` from ``exact`` (the largest difference), and never less than one rounding of the
    largest value: a result that happened to round exactly is no evidence that another order would."""
    exact = exact.double()
    return max(float((y.double() - exact).abs().max()), unit * float(exact.abs().max()))


def reevaluation_bound(reference: torch.Tensor, exact: torch.Tensor, unit: float) -> float:
    """The most an evaluation that rounds differently may differ from ``reference``: the reference's rounding error
    plus its own, which is as large within ``REROUNDED_SLACK``."""
    return (1 + REROUNDED_SLACK) * rounding_error(reference, exact, unit)


def clear_steps(logits: torch.Tensor, bound: float) -> torch.Tensor:
    """Steps (``logits [..., V]``) whose top logit leads the next by more than ``2 * bound``: an evaluation whose
    logits lie within ``bound`` of these chooses the same greedy token there."""
    top2 = logits.float().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1] > 2 * bound
