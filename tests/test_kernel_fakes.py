"""Every C++ op a compiled forward can meet has a fake (meta) implementation whose output shape, dtype and strides
match the real op, so torch.compile traces through the kernels (the fused decode step is never compiled)."""

import pytest
import torch

import glmkit.kernels as kernels
from glmkit.kernels import reference
from glmkit.quantize import quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"C++ kernels not available: {kernels.unavailable_reason()}"
)


def samples() -> dict[str, tuple]:
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(40, 64).bfloat16()
    q8, q4 = quantize_int8(torch.randn(40, 64)), quantize_int4(torch.randn(32, 64), 32)
    q, k = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 7, 16).bfloat16()
    mask = torch.rand(2, 1, 5, 7) > 0.3
    return {
        "linear_bf16": (x, w, torch.randn(40)),
        "linear_f32": (x.float(), w.float(), None),
        "linear_int8": (x, *q8, None),
        "linear_int4": (x, *q4, 32, None),
        "linear_int4x16": (x, *reference.interleave_int4(*q4), 32, None),
        "pack_bf16": (w,),
        "linear_packed_bf16": (x.float(), kernels.pack_weight(w), 40, None),
        "gelu_tanh": (x,),
        "rotary": (q, torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8)),
        "attention": (q, k, k, mask, True),
    }


@pytest.mark.parametrize("name", list(samples()))
def test_fake_matches_the_kernel(name):
    op = getattr(torch.ops.glmkit_kernels, name).default
    torch.library.opcheck(op, samples()[name], test_utils=("test_schema", "test_faketensor"))
