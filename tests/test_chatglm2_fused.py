"""The fused decode step (``decode_blocks``) on ChatGLM2/3/GLM-4 blocks: RMSNorm, SwiGLU, grouped KV heads and the
partial 1-D rotary computed in one C++ call equal the per-op Python step of the same bf16 model, for ragged rows and
rows of a pool (serving's slots), bf16 / int8 / int4 weights, and shapes other than the fixture's."""

import copy
import dataclasses

import pytest
import torch

from glmkit import GLM, KVCache, kernels
from glmkit.chatglm import ChatGLM2, ChatGLM2Config
from glmkit.generate.causal import prefill
from glmkit.generate.fast import DecodeStep, cache_dtype, optimize_for_decode
from glmkit.kernels import layout
from glmkit.quantize import QuantScheme, quantize_model

from .conftest import FIXTURES

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the fused step needs the kernels")

PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 7, 120, 64, 11], [8, 30, 2, 199]]  # ragged: 11 and 4 cached tokens
STEPS = 6


def fixture_model() -> ChatGLM2:
    return GLM.from_pretrained(FIXTURES / "chatglm2", dtype=torch.float32).eval()


def shaped_model(**changes) -> ChatGLM2:
    """A random ChatGLM2 of another shape (head size, groups, rope_ratio, depth), attention sharpened so that a wrong
    score, group or position shows in the logits."""
    torch.manual_seed(0)
    model = ChatGLM2(dataclasses.replace(ChatGLM2Config(), **changes)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4)
        model.lm_head.weight.mul_(20)  # logits spread like a trained model's, so that the bounds below mean something
    return model


def step_logits(model: torch.nn.Module, fused: bool, slots: list[int] | None, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[STEPS, 2, V]`` of decoding ``tokens`` after the prompts, through the fused or the Python step."""
    pool = KVCache.for_model(model, 4 if slots else 2, 32, dtype=cache_dtype(model))
    cache = pool.rows(slots) if slots else pool
    with torch.inference_mode():
        prefill(model, PROMPTS, cache)
        step = DecodeStep(model)
        assert (step.fused is not None) == (next(model.parameters()).dtype == torch.bfloat16 and kernels.available())
        if not fused:
            step.fused = None
        positions = torch.tensor([len(p) for p in PROMPTS])
        out = []
        for i in range(STEPS):
            out.append(step(tokens[i][:, None], (positions + i)[:, None], cache).float())
    return torch.stack(out)


def check_fused(model32: ChatGLM2, bits: int | None = None) -> None:
    half = copy.deepcopy(model32).to(torch.bfloat16) if bits is None else _quantized(model32, bits)
    tokens = torch.randint(0, half.config.vocab_size, (STEPS, 2), generator=torch.Generator().manual_seed(1))
    exact = step_logits(copy.deepcopy(half).float(), False, None, tokens)  # the same weights, fp32 math
    model = optimize_for_decode(half)
    for slots in (None, [3, 1]):
        fused = step_logits(model, True, slots, tokens)
        plain = step_logits(model, False, slots, tokens)
        # both are the bf16 model's step; they differ in where bf16 rounds (the Python path rounds each rotary
        # product and SDPA's inputs, the fused one rounds each op's result once), so the fused step must be as
        # close to the fp32 computation of the same weights as the Python step is
        assert (fused - exact).abs().max() <= (plain - exact).abs().max() * 1.5 + 1e-3
        assert (plain - exact).abs().max() < 0.5  # and both are the model: far below the logits' spread
        assert exact.std() > 0.5


def _quantized(model32: ChatGLM2, bits: int) -> ChatGLM2:
    q = copy.deepcopy(model32).to(torch.bfloat16)
    quantize_model(q, QuantScheme(bits, 32 if bits == 4 else None))
    return q


def test_fused_step_is_the_python_step_on_the_fixture_model():
    check_fused(fixture_model())


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_step_on_quantized_weights(bits):
    check_fused(fixture_model(), bits)


@pytest.mark.parametrize(
    "changes",
    [
        dict(n_embd=128, n_head=2, head_size=64, multi_query_group_num=1, rope_ratio=4.0),
        dict(n_embd=96, n_head=6, head_size=24, multi_query_group_num=3, ffn_hidden_size=40),
        dict(n_embd=64, n_head=4, head_size=16, multi_query_group_num=4, add_qkv_bias=False, n_layer=3),
    ],
)
def test_fused_step_on_other_shapes(changes):
    check_fused(shaped_model(**changes))


def test_fused_step_is_not_used_where_it_cannot_run():
    half = fixture_model().to(torch.bfloat16)
    assert DecodeStep(half).fused is not None
    assert len(DecodeStep(half).fused.tensors) == layout.DECODE_TENSORS_PER_BLOCK * half.config.n_layer
    assert DecodeStep(fixture_model()).fused is None  # fp32
    per_head = shaped_model(multi_query_attention=False).to(torch.bfloat16)  # rows interleaved per head
    assert DecodeStep(per_head).fused is None
    post_ln = shaped_model(apply_residual_connection_post_layernorm=True).to(torch.bfloat16)
    assert DecodeStep(post_ln).fused is None
