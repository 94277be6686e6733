"""The fused decode step's inputs: rope rows looked up in a table equal the rows the model's own rotary functions
compute (GLM's 2D interleaved, ChatGLM-6B's rotate-half, ChatGLM2's partial 1-D), also past the table's first size;
the kernels' final norm equals torch's LayerNorm / RMSNorm on bf16 rows, and names bad arguments."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from glmkit import GLM, GLMConfig, kernels
from glmkit.chatglm import ChatGLM2, ChatGLM2Config
from glmkit.generate.fast import _rope_rows, _RopeTable

from .conftest import FIXTURES


def models() -> dict[str, torch.nn.Module]:
    glm = GLM(
        dataclasses.replace(GLMConfig(), n_layer=1, n_embd=64, n_head=2, position_encoding="rotary_2d_interleaved")
    )
    six = GLM.from_pretrained(FIXTURES / "chatglm6b", dtype=torch.float32)
    two = ChatGLM2(dataclasses.replace(ChatGLM2Config(), n_layer=1, rope_ratio=4.0))
    return {"glm": glm, "chatglm6b": six, "chatglm2": two}


@pytest.mark.parametrize("name", ["glm", "chatglm6b", "chatglm2"])
def test_rope_rows_by_lookup_equal_the_computed_rows(name):
    model = models()[name]
    table = _RopeTable(model)
    g = torch.Generator().manual_seed(0)
    for high in (40, 300, 2000):  # the second and third pass the table's first 256 rows: it grows
        pos = torch.randint(0, high, (5,), generator=g)
        block = torch.randint(0, 30, (5,), generator=g)
        positions = pos[:, None] if name == "chatglm2" else torch.stack([pos, block], 1)[..., None]
        torch.testing.assert_close(table(positions), _rope_rows(model, positions), atol=1e-6, rtol=0)
    assert len(table.rows) > 2000


@pytest.mark.skipif(not kernels.available(), reason="the kernels' norm op")
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_final_norm_is_torchs(kind):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 96, generator=g) * 4 + 1).bfloat16()
    norm = nn.LayerNorm(96, eps=1e-5) if kind == "layer" else nn.RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
        if kind == "layer":
            norm.bias.copy_(torch.randn(96, generator=g))
    norm = norm.bfloat16()
    bias = norm.bias if kind == "layer" else None
    got = torch.ops.glmkit_kernels.norm.default(x, norm.weight, bias, norm.eps)
    with torch.no_grad():
        expected = norm(x)
    # both compute in fp32 and round once to bf16 (RMSNorm also rounds the normalized value before the weight);
    # they may differ in the sums' order: at most one bf16 step of the value
    assert (got.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-7
    with pytest.raises(RuntimeError, match="hidden size 96"):
        torch.ops.glmkit_kernels.norm.default(x, norm.weight[:64], None, 1e-5)
    with pytest.raises(RuntimeError, match="bf16"):
        torch.ops.glmkit_kernels.norm.default(x.float(), norm.weight, None, 1e-5)
