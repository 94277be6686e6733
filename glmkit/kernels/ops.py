"""Weight-only linear layers for decoding: glmkit's C++ kernels where they run, else the PyTorch reference.

fp32 weights (``linear``) take the kernels' fp32 GEMV for a few fp32 rows.

Chosen per dtype by measurement on the project's CPU (benchmarks/RESULTS.md): the stock bf16 GEMV and
``torch._weight_int8pack_mm`` / ``torch._weight_int4pack_mm_for_cpu`` reach a fraction of the memory bandwidth at
decode sizes, so every dtype runs on our kernels. A bf16 ``x`` of more than 56 rows (a large batch, a prefill) is
handed by the op itself to oneDNN's GEMM (``BF16_GEMV_MAX_ROWS`` in csrc/linear.h, also used by the fused decode
step); an fp32 ``x`` of more than ``F32_MAX_ROWS`` rows goes to the stock op here. A weight packed in panels
(``pack_weight``) serves every batch size with ``linear_packed``; prefills attend and turn rotary positions on the
kernels too (``attention``, ``rotary``).
CUDA tensors, autograd and dtypes the kernels do not take (fp16) use the reference: dequantize, then ``F.linear``
(correct, not tuned).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rotary import apply_interleaved
from . import build, reference
from .layout import INT4_BLOCK_ROWS, INT4_GROUP_SIZES, MAX_HEAD_SIZE, PANEL_ROWS

F32_MAX_ROWS = 64  # fp32 activations: the stock op would first need an fp32 copy of the whole weight
_ACT_DTYPES = (torch.float32, torch.bfloat16)
_ops: dict[str, object] = {}  # the loaded extension's op overloads, looked up once (a namespace lookup costs ~1 us)


def _op(name: str):
    if not _ops:
        ns = torch.ops.glmkit_kernels
        names = ("linear_bf16", "linear_f32", "linear_int8", "linear_int4", "linear_int4x16", "gelu_tanh", "pack_bf16")
        names += ("linear_packed_bf16", "attention", "rotary")
        _ops.update({n: getattr(ns, n).default for n in names})
    return _ops[name]


def register_fakes() -> None:
    """Output shapes of the inference ops, so that torch.compile traces through them (build.load() calls this)."""

    def rows(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], n)

    fake = torch.library.register_fake
    for name in ("linear_bf16", "linear_f32"):
        fake(f"glmkit_kernels::{name}")(lambda x, w, bias: rows(x, w.shape[0]))
    fake("glmkit_kernels::linear_int8")(lambda x, w, scales, bias: rows(x, w.shape[0]))
    fake("glmkit_kernels::linear_int4")(lambda x, w, scales, group, bias: rows(x, w.shape[0]))
    fake("glmkit_kernels::linear_int4x16")(lambda x, w, scales, group, bias: rows(x, w.shape[0] * INT4_BLOCK_ROWS))
    fake("glmkit_kernels::linear_packed_bf16")(lambda x, packed, n, bias: rows(x, n))
    fake("glmkit_kernels::pack_bf16")(
        lambda w: w.new_empty(-(-w.shape[0] // PANEL_ROWS), w.shape[1] // 2, 2 * PANEL_ROWS)
    )
    fake("glmkit_kernels::gelu_tanh")(lambda x: torch.empty_like(x, memory_format=torch.contiguous_format))
    fake("glmkit_kernels::rotary")(lambda x, cos, sin: torch.empty_like(x, memory_format=torch.contiguous_format))
    fake("glmkit_kernels::attention")(
        lambda q, k, v, mask, bf16_out: q.new_empty(
            q.shape[0], q.shape[2], q.shape[1] * q.shape[3], dtype=torch.bfloat16 if bf16_out else torch.float32
        )
    )


def available(device: torch.device | str = "cpu") -> bool:
    """Whether the C++ kernels run for tensors on ``device`` (builds them on the first call)."""
    return torch.device(device).type == "cpu" and build.load()


def _use_kernel(x: torch.Tensor, weight: torch.Tensor, *floats: torch.Tensor | None, per_row: float = 1) -> bool:
    """``per_row``: weight columns per input (1; 1/2 for int4's packed rows, 8 for 16 interleaved int4 rows)."""
    # called ~100 times per decoded token: cheapest checks first
    if not (x.is_cpu and x.dtype in _ACT_DTYPES and weight.is_contiguous()):
        return False
    if x.shape[-1] * per_row != weight.shape[1]:
        return False  # let the reference raise its shape error
    for t in floats:
        if t is not None and (t.dtype not in _ACT_DTYPES or not t.is_contiguous()):
            return False
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or any(t is not None and t.requires_grad for t in floats)
    ):
        return False  # the kernels have no backward
    return build.load()


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a bf16 ``weight [N, K]``; ``x [..., K]`` fp32 or bf16, output in ``x``'s dtype.

    On the kernel path ``x`` is rounded to bf16 and products are summed in fp32 (what bf16 inference does)."""
    few_rows = x.dtype == torch.bfloat16 or x.numel() <= F32_MAX_ROWS * weight.shape[1]
    if weight.dtype == torch.bfloat16 and few_rows and _use_kernel(x, weight, bias):
        y = _op("linear_bf16")(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return reference.linear_bf16(x, weight, bias)


def linear_int8(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T + bias`` for ``qweight int8 [N, K]`` and ``scales [N]``.

    On the kernel path each row of ``x`` is held as 16-bit fixed point (finer than bf16) and the integer products
    are summed exactly."""
    if qweight.dtype == torch.int8 and _use_kernel(x, qweight, scales, bias):
        y = _op("linear_int8")(x.reshape(-1, x.shape[-1]), qweight, scales, bias)
        return y.view(*x.shape[:-1], qweight.shape[0])
    return reference.linear_int8(x, qweight, scales, bias)


def linear_int4(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for the int4 weight ``W = (u - 8) * scales`` packed as in reference.py.

    ``packed uint8 [N, K / 2]``, ``scales [N, K / group_size]``. On the kernel path ``x`` is rounded to bf16."""
    if (
        packed.dtype == torch.uint8
        and group_size in INT4_GROUP_SIZES
        and _use_kernel(x, packed, scales, bias, per_row=0.5)
    ):
        y = _op("linear_int4")(x.reshape(-1, x.shape[-1]), packed, scales, group_size, bias)
        return y.view(*x.shape[:-1], packed.shape[0])
    return reference.linear_int4(x, packed, scales, group_size, bias)


def linear_int4x16(
    x: torch.Tensor,
    w16: torch.Tensor,
    scales16: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``linear_int4`` for a weight held 16 rows interleaved (``reference.interleave_int4``)."""
    fits = _use_kernel(x, w16, scales16, bias, per_row=INT4_BLOCK_ROWS // 2)  # a block row holds 16 rows' nibbles
    if w16.dtype == torch.uint8 and group_size in INT4_GROUP_SIZES and fits:
        y = _op("linear_int4x16")(x.reshape(-1, x.shape[-1]), w16, scales16, group_size, bias)
        return y.view(*x.shape[:-1], w16.shape[0] * INT4_BLOCK_ROWS)
    return reference.linear_int4x16(x, w16, scales16, group_size, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` on the kernels for a bf16 ``weight``, and for an fp32 one with up to ``F32_MAX_ROWS`` fp32
    rows of ``x`` (decoding: the stock fp32 GEMV streams at a fraction of the bandwidth); the stock op otherwise."""
    if weight.dtype == torch.bfloat16:
        return linear_bf16(x, weight, bias)
    few_rows = x.dtype == torch.float32 and x.numel() <= F32_MAX_ROWS * weight.shape[-1]
    if weight.dtype == torch.float32 and few_rows and _use_kernel(x, weight, bias):
        y = _op("linear_f32")(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A bf16 CPU ``weight [N, K]`` laid out in panels of ``PANEL_ROWS`` (32) rows for ``linear_packed``
    (``[ceil(N / 32), K / 2, 64]``, the last panel padded with zeros), or None where the kernels do not run, the weight
    is not a bf16 CPU matrix or ``K`` is odd."""
    if weight.dtype != torch.bfloat16 or not weight.is_cpu or weight.dim() != 2 or weight.shape[1] % 2:
        return None
    return _op("pack_bf16")(weight.detach()) if build.load() else None


def unpack_weight(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The ``[out_features, K]`` weight that ``pack_weight`` laid out as ``packed`` (exact)."""
    P, K2, _ = packed.shape
    return packed.view(P, K2, PANEL_ROWS, 2).transpose(1, 2).reshape(P * PANEL_ROWS, 2 * K2)[:out_features].contiguous()


def linear_packed(
    x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` for the ``pack_weight`` panels of a bf16 ``W [out_features, K]``: ``x`` (fp32 or bf16) is
    taken in bf16, the sums are fp32, the result has ``x``'s dtype."""
    y = _op("linear_packed_bf16")(x.reshape(-1, x.shape[-1]), packed, out_features, bias)
    return y.view(*x.shape[:-1], out_features)


def _no_grad(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_interleaved(x, (cos, sin))`` (glmkit/rotary.py), the same values; an fp32 CPU ``x [B, H, S, D]`` with
    contiguous heads and ``cos, sin [B, 1, S, D / 2]`` take one kernel pass instead of six ATen ops."""
    cos, sin = (t.to(x.dtype) for t in (cos, sin))
    B, H, S, D = x.shape
    fits = x.is_cpu and x.dtype == torch.float32 and x.stride(-1) == 1 and D % 2 == 0 and _no_grad(x, cos, sin)
    if fits and cos.shape == sin.shape == (B, 1, S, D // 2) and build.load():
        return _op("rotary")(x, cos.contiguous(), sin.contiguous())
    return apply_interleaved(x, (cos, sin))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D), masked) v`` for ``q [B, H, S, D]`` over ``k, v [B, H, T, D]`` with a boolean ``mask
    [B, 1 or H, S, T]`` (None: every key), in fp32 for an fp32 ``q``, returned as ``[B, S, H * D]`` in ``out_dtype``.
    fp32 CPU queries over fp32 or bf16 keys take the kernels: one pass per query (SDPA's CPU kernel is sized for long
    sequences: 2-3x slower on short prefills); a query that sees no key gets zeros there."""
    B, H, S, D = q.shape
    heads_ok = all(t.stride(-1) == 1 and t.stride(-2) == D for t in (k, v)) and q.stride(-1) == 1
    dtypes_ok = q.dtype == torch.float32 and k.dtype == v.dtype and k.dtype in _ACT_DTYPES
    mask_ok = mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.stride(-1) == 1)
    fits = q.is_cpu and heads_ok and dtypes_ok and mask_ok and out_dtype in _ACT_DTYPES and D <= MAX_HEAD_SIZE
    if fits and _no_grad(q, k, v) and build.load():
        return _op("attention")(q, k, v, mask, out_dtype == torch.bfloat16)
    y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
    return y.transpose(1, 2).reshape(B, S, H * D).to(out_dtype)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu``; a bf16 CPU tensor with ``approximate="tanh"`` takes the kernels' vector GELU (fp32 math, one
    rounding: ~10x ATen's bf16 GELU on this CPU, the same values within one bf16 rounding)."""
    fits = x.is_cpu and x.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and x.requires_grad)
    if approximate == "tanh" and fits and build.load():
        return _op("gelu_tanh")(x)
    return F.gelu(x, approximate=approximate)
