"""The weight formats of glmkit's kernels, and the same linear layers in plain PyTorch.

This is the definition the C++ kernels are tested against and the path taken wherever they cannot run: no
compiler, a CPU without AVX2, a CUDA tensor. Correct everywhere, fast nowhere.

Activations: the kernels take ``x`` rounded to bf16 (bf16 weights, and int4 on AVX-512) or as 16-bit fixed point per
row (int8 everywhere, int4 on AVX2: ``fixed16``), and multiply exactly; ``kernel_activations`` says which.

Formats (weight ``[N, K]`` = ``[out_features, in_features]``):
- int8: ``int8 [N, K]`` with one fp32 scale per output row, ``w = q * scale[n]``.
- int4: ``uint8 [N, K / 2]``, two values per byte, with a scale per row and group of ``group_size`` inputs,
  ``w = (u - 8) * scale[n, k // group_size]`` for the stored nibble ``u`` in 0..15. Within a row the nibbles are
  packed in chunks of 64 inputs, byte ``j`` = ``e[j] | e[j + 32] << 4``, so that one 32-byte load gives 64
  contiguous values; when ``K % 64 == 32`` the final chunk of 32 packs byte ``j`` = ``e[j] | e[j + 16] << 4``.
- int4, 16 rows interleaved (how ``QuantizedLinear`` holds an int4 weight in memory when ``N % 16 == 0``; the
  checkpoint keeps the layout above): ``uint8 [N / 16, 8 K]``, per block of 16 rows and per 4 inputs ``k..k+3``
  32 bytes, row ``i``'s bytes ``2i = u[k] | u[k + 2] << 4`` and ``2i + 1 = u[k + 1] | u[k + 3] << 4``; scales
  ``[N / 16, K / group_size, 16]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import FIXED16_MAX, INT4_BLOCK_ROWS

INT4_OFFSET = 8  # stored nibble u = q + 8 for q in -8..7


def fixed16(x: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` as the kernels hold it in 16-bit fixed point, one step per row (nearest even), back in fp32."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    step = torch.where(amax > 0, amax / FIXED16_MAX, torch.ones_like(amax))
    return torch.round(x * (1 / step)).clamp(-FIXED16_MAX, FIXED16_MAX) * step


def kernel_activations(x: torch.Tensor, weight_format: str, isa: str) -> torch.Tensor:
    """``x`` rounded as the ``isa`` kernels round it for ``weight_format`` (bf16, int8, int4), in fp32."""
    if weight_format == "int8" or (weight_format == "int4" and isa == "avx2"):
        return fixed16(x)
    return x.bfloat16().float()


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Pack nibbles ``u`` (integers 0..15, shape ``[N, K]``, ``K % 32 == 0``) into ``uint8 [N, K / 2]``."""
    N, K = u.shape
    if K % 32:
        raise ValueError(f"int4 packing needs in_features divisible by 32, got {K}")
    u = u.to(torch.uint8)
    k64 = K // 64 * 64
    body = u[:, :k64].reshape(N, -1, 2, 32)
    parts = [(body[:, :, 0] | (body[:, :, 1] << 4)).reshape(N, -1)]
    if k64 < K:
        tail = u[:, k64:].reshape(N, 2, 16)
        parts.append(tail[:, 0] | (tail[:, 1] << 4))
    return torch.cat(parts, dim=1).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The nibbles of ``pack_int4``'s output, ``uint8 [N, K]``."""
    N, KB = packed.shape
    K = 2 * KB
    k64 = K // 64 * 64
    body = packed[:, : k64 // 2].reshape(N, -1, 32)
    parts = [torch.stack([body & 15, body >> 4], dim=2).reshape(N, -1)]
    if k64 < K:
        tail = packed[:, k64 // 2 :]
        parts.append(torch.cat([tail & 15, tail >> 4], dim=1))
    return torch.cat(parts, dim=1)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (qweight.float() * scales.float()[:, None]).to(dtype)


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return dequantize_nibbles(unpack_int4(packed), scales, group_size, dtype)


def dequantize_nibbles(
    u: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(u - 8) * scale`` for unpacked nibbles ``u [N, K]`` and their scales ``[N, K / group_size]``."""
    q = u.float() - INT4_OFFSET
    N, K = q.shape
    w = q.view(N, K // group_size, group_size) * scales.float()[:, :, None]
    return w.view(N, K).to(dtype)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def linear_int8(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    y = F.linear(x.float(), qweight.float()) * scales.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def linear_int4(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    y = F.linear(x.float(), dequantize_int4(packed, scales, group_size))
    return (y if bias is None else y + bias.float()).to(x.dtype)


def interleave_int4(
    packed: torch.Tensor, scales: torch.Tensor, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 layout above (``uint8 [N, K / 2]``, scales ``[N, K / G]``) as 16 rows interleaved. Each block of 16
    rows keeps its bytes, reordered: ``in_place`` rewrites ``packed`` and ``scales`` (contiguous) and returns views
    of them, for a caller that owns them (loading a checkpoint: no second copy of the weights)."""
    N, K, B = packed.shape[0], packed.shape[1] * 2, INT4_BLOCK_ROWS
    if N % B:
        raise ValueError(f"interleaving int4 weights needs out_features divisible by {B}, got {N}")
    ng = scales.shape[1]
    if in_place:
        w16, s16 = packed.view(N // B, B // 2 * K), scales.view(N // B, ng, B)
    else:
        w16 = torch.empty(N // B, B // 2 * K, dtype=torch.uint8, device=packed.device)
        s16 = torch.empty(N // B, ng, B, dtype=scales.dtype, device=scales.device)
    for r in range(0, N, 4 * B):  # a few blocks at a time: read (copied) before the same bytes are written
        u = unpack_int4(packed[r : r + 4 * B]).reshape(-1, B, K // 4, 4).transpose(1, 2)
        b = torch.stack([u[..., 0] | (u[..., 2] << 4), u[..., 1] | (u[..., 3] << 4)], dim=-1).reshape(-1, B // 2 * K)
        sc = scales[r : r + 4 * B].reshape(-1, B, ng).transpose(1, 2).clone(memory_format=torch.contiguous_format)
        w16[r // B : r // B + b.shape[0]] = b
        s16[r // B : r // B + b.shape[0]] = sc
    return w16, s16


def int4x16_rows(
    w16: torch.Tensor, scales16: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` (all when None) of an interleaved int4 weight as nibbles ``[n, K]`` and scales ``[n, K / G]``."""
    B = INT4_BLOCK_ROWS
    NB, K = w16.shape[0], w16.shape[1] // (B // 2)
    b = w16.view(NB, K // 4, B, 2)  # byte pair of (block, inputs 4j..4j+3, row in block)
    if rows is None:
        b, s = b.transpose(1, 2).reshape(NB * B, K // 4, 2), scales16.transpose(1, 2).reshape(NB * B, -1)
    else:
        b, s = b[rows // B, :, rows % B], scales16[rows // B, :, rows % B]
    u = torch.stack([b[..., 0] & 15, b[..., 1] & 15, b[..., 0] >> 4, b[..., 1] >> 4], dim=-1)  # k, k+1, k+2, k+3
    return u.reshape(-1, K), s


def deinterleave_int4(w16: torch.Tensor, scales16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``interleave_int4``."""
    u, s = int4x16_rows(w16, scales16)
    return pack_int4(u), s.contiguous()


def linear_int4x16(
    x: torch.Tensor, w16: torch.Tensor, scales16: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    u, s = int4x16_rows(w16, scales16)
    y = F.linear(x.float(), dequantize_nibbles(u, s, group_size))
    return (y if bias is None else y + bias.float()).to(x.dtype)
