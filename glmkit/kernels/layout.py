"""The kernels' data layouts and limits, each written once.

Python (quantization, the reference path, the fused decode step's argument list) reads them here; ``build.py``
passes every one to the C++ as a ``-D`` flag (``compile_flags``), and the C++ ``static_assert``s that the code
written around a value still matches it (a register layout cannot follow any value: the 16-row int4 blocks fill one
AVX-512 vector of fp32 sums). This module imports nothing, so every layer of glmkit may read it.
"""

from __future__ import annotations

import enum

FIXED16_MAX = 32767  # activations as 16-bit fixed point: x[m] ~ q * step[m], |q| <= FIXED16_MAX (reference.fixed16)
INT4_GROUP_SIZES = (32, 64, 128)  # inputs per int4 scale that the kernels (and hence glmkit quantize) support
INT4_BLOCK_ROWS = 16  # rows per block of an interleaved int4 weight (reference.interleave_int4)
PANEL_ROWS = 32  # output rows per panel of a packed bf16 weight (ops.pack_weight)
MAX_HEAD_SIZE = 128  # the attention kernels hold one head's query in registers


class LinearKind(enum.IntEnum):
    """How the fused decode step (``decode_blocks``) multiplies one of a block's linears."""

    BF16 = 0  # bf16 weight (its panels in the scales' place when packed)
    INT8 = 1
    INT4 = 2  # row-major nibbles
    INT4X16 = 3  # 16 rows interleaved


# decode_blocks' arguments per block: the two norms' (weight, bias), then per linear (weight, scales, bias) and
# (kind, group size); qkv, attention output, MLP in, MLP out, in that order
DECODE_NORM_TENSORS = 4
DECODE_LINEARS = 4
DECODE_TENSORS_PER_BLOCK = DECODE_NORM_TENSORS + 3 * DECODE_LINEARS
DECODE_META_PER_BLOCK = 2 * DECODE_LINEARS


def compile_flags() -> list[str]:
    """Every constant above as the ``-DGLMKIT_<NAME>=<value>`` flags the C++ reads."""
    values: dict[str, object] = {
        "FIXED16_MAX": FIXED16_MAX,
        "INT4_GROUP_SIZES": ",".join(map(str, INT4_GROUP_SIZES)),
        "INT4_BLOCK_ROWS": INT4_BLOCK_ROWS,
        "PANEL_ROWS": PANEL_ROWS,
        "MAX_HEAD_SIZE": MAX_HEAD_SIZE,
        "DECODE_TENSORS_PER_BLOCK": DECODE_TENSORS_PER_BLOCK,
        "DECODE_META_PER_BLOCK": DECODE_META_PER_BLOCK,
        **{f"KIND_{kind.name}": int(kind) for kind in LinearKind},
    }
    return [f"-DGLMKIT_{name}={value}" for name, value in values.items()]
