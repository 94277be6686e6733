"""The fused decode step (``decode_blocks``) on ChatGLM-6B blocks: per-head QKV rows, the rotate-half 2D rotary and
the residual ``LN(x)·α + f(LN(x))`` computed in one C++ call equal the per-op Python step of the same bf16 model,
for ragged rows and rows of a pool (serving's slots), bf16 / int8 / int4 weights, and shapes other than the
fixture's; generation through the fused step gives the Python path's tokens."""

import copy

import pytest
import torch

from glmkit import GLM, KVCache, kernels
from glmkit.chatglm.v1 import ChatGLM6B
from glmkit.generate import generate
from glmkit.generate.fast import DecodeStep, cache_dtype, optimize_for_decode
from glmkit.quantize import QuantScheme, quantize_model

from .conftest import FIXTURES
from .test_chatglm6b import random_checkpoint, write_checkpoint

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the fused step needs the kernels")

PROMPTS = [[5, 17, 60, 3, 25, 41, 7, 7, 12, 64, 11], [8, 30, 2, 19]]  # ragged: 11 and 4 cached tokens
STEPS = 6


def fixture_model() -> ChatGLM6B:
    return GLM.from_pretrained(FIXTURES / "chatglm6b", dtype=torch.float32).eval()


def shaped_model(tmp_path, hidden: int, heads: int, inner: int, layers: int) -> ChatGLM6B:
    config, state = random_checkpoint(hidden, heads, inner, layers)
    model = GLM.from_pretrained(write_checkpoint(tmp_path / f"m{hidden}x{heads}", config, state), dtype=torch.float32)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4)  # sharper attention: a wrong score, pair or position shows in the logits
    return model.eval()


def step_logits(model: torch.nn.Module, fused: bool, slots: list[int] | None, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[STEPS, 2, V]`` of decoding ``tokens`` after the prompts (each prefilled bidirectionally at positions
    0..n-1), the new tokens at the last prompt position with block positions 1, 2, ... (the hub's decode layout)."""
    pool = KVCache.for_model(model, 4 if slots else 2, 32, dtype=cache_dtype(model))
    rows = slots or [0, 1]
    with torch.inference_mode():
        for slot, prompt in zip(rows, PROMPTS, strict=True):
            ids = torch.tensor([prompt])
            positions = torch.stack([torch.arange(len(prompt)), torch.zeros(len(prompt), dtype=torch.long)])[None]
            model.cached_forward(ids, positions, None, pool.rows([slot]))
        cache = pool.rows(slots) if slots else pool
        step = DecodeStep(model)
        assert (step.fused is not None) == (next(model.parameters()).dtype == torch.bfloat16)
        if not fused:
            step.fused = None
        last = torch.tensor([len(p) - 1 for p in PROMPTS])
        out = []
        for i in range(STEPS):
            positions = torch.stack([last, torch.full_like(last, i + 1)], dim=1)[..., None]  # [N, 2, 1]
            out.append(step(tokens[i][:, None], positions, cache).float())
    return torch.stack(out)


def check_fused(model32: ChatGLM6B, bits: int | None = None) -> None:
    half = copy.deepcopy(model32).to(torch.bfloat16)
    if bits is not None:
        quantize_model(half, QuantScheme(bits, 32 if bits == 4 else None))
    tokens = torch.randint(0, half.config.vocab_size, (STEPS, 2), generator=torch.Generator().manual_seed(1))
    exact = step_logits(copy.deepcopy(half).float(), False, None, tokens)  # the same weights, fp32 math
    model = optimize_for_decode(half)
    for slots in (None, [3, 1]):
        fused = step_logits(model, True, slots, tokens)
        plain = step_logits(model, False, slots, tokens)
        # both are the bf16 model's step with bf16 rounding after each op; they round in the same places but for
        # the order of a few sums, so they must agree far more closely than either agrees with the fp32 computation
        # of the same weights (ChatGLM-6B's α = 7.5 residuals amplify bf16 rounding: that gap is not small here)
        bf16_error = (plain - exact).abs().max()
        assert (fused - plain).abs().max() <= 0.25 * bf16_error + 1e-3
        assert bf16_error < exact.std() and exact.std() > 0.5  # and both are the model, not noise


def test_fused_step_is_the_python_step_on_the_fixture_model():
    check_fused(fixture_model())


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_step_on_quantized_weights(bits):
    check_fused(fixture_model(), bits)


@pytest.mark.parametrize(("hidden", "heads", "inner", "layers"), [(72, 3, 100, 3), (64, 8, 40, 1), (256, 2, 64, 2)])
def test_fused_step_on_other_shapes(hidden, heads, inner, layers, tmp_path):
    check_fused(shaped_model(tmp_path, hidden, heads, inner, layers))


def _fused_with(monkeypatch, **change) -> None:
    """Every ``DecodeStep`` made from now on runs with ``change`` applied to its fused arguments (``fused=None``: the
    Python step)."""
    original = DecodeStep.__init__

    def patched(self, m, compile=False):
        original(self, m, compile)
        if "fused" in change:
            self.fused = change["fused"]
        else:
            for name, value in change.items():
                setattr(self.fused, name, value)

    monkeypatch.setattr(DecodeStep, "__init__", patched)


@pytest.mark.parametrize("change", [dict(qkv_per_head=False), dict(rope_halves=0), dict(residual_alpha=0.0)])
def test_a_wrong_pairing_or_residual_would_show(change, monkeypatch):
    """The switches matter: each of ChatGLM-6B's read as GLM's (blocked QKV rows, adjacent rotary pairs, pre-LN
    residuals) gives other logits, so the equality above is not that of a step that ignores them."""
    model = optimize_for_decode(fixture_model().to(torch.bfloat16))
    tokens = torch.randint(0, model.config.vocab_size, (STEPS, 2), generator=torch.Generator().manual_seed(1))
    right = step_logits(model, True, None, tokens)
    _fused_with(monkeypatch, **change)
    assert (step_logits(model, True, None, tokens) - right).abs().max() > 0.05


def test_greedy_generation_through_the_fused_step_is_the_python_paths(monkeypatch):
    model = fixture_model().to(torch.bfloat16)
    assert DecodeStep(optimize_for_decode(copy.deepcopy(model))).fused is not None
    gmask = model.config.gmask_token_id
    prompts = [[5, 17, 60, 3, 25, gmask], [8, 30, gmask]]
    fused = generate(model, prompts, max_new_tokens=10, eos_token_id=3).new_tokens
    _fused_with(monkeypatch, fused=None)
    assert generate(model, prompts, max_new_tokens=10, eos_token_id=3).new_tokens == fused


def test_bad_switches_are_named():
    model = optimize_for_decode(fixture_model().to(torch.bfloat16))
    f = DecodeStep(model).fused
    pool = KVCache.for_model(model, 1, 8, dtype=torch.bfloat16)
    x = torch.zeros(1, model.config.n_embd, dtype=torch.bfloat16)
    op = torch.ops.glmkit_kernels.decode_blocks.default
    args = (x, f.tensors, f.meta, pool.k, pool.v, [0], [0], None, f.n_head, f.eps, f.activation)
    with pytest.raises(RuntimeError, match="rope_halves 3"):
        op(*args, True, 3, 1.0)
    with pytest.raises(RuntimeError, match="residual_alpha"):
        op(*args, True, 2, -1.0)
