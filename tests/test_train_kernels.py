"""Training attention and dropout on the C++ kernels == PyTorch's math with the same masks; the training loop swaps
them into the model from outside."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from glmkit import GLM, GLMConfig, kernels
from glmkit.kernels.training import Dropout, KernelAttention, _Attention, attention, use_training_kernels
from glmkit.masks import prefix_lm_mask
from glmkit.model import ScaledDotProductAttention
from glmkit.train.loop import TrainArgs, fit

from .helpers.synthetic import synthetic_source

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"C++ kernels not available: {kernels.unavailable_reason()}"
)


def qkv(B=2, H=3, S=64, T=64, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g)
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    return [t.bfloat16().requires_grad_() for t in (q, k, v)]


def reference(q, k, v, mask, keep=None, p=0.0):
    """fp32 softmax attention; ``keep`` [B, H, S, T] applies dropout exactly where the kernel did."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    if keep is not None:
        probs = probs * keep / (1 - p)
    return probs @ v, (q, k, v)


def glm_mask(B, S, seps=(20, 40), lengths=(64, 50)):
    return prefix_lm_mask(torch.tensor(seps[:B]), S, torch.tensor(lengths[:B]))


def grads(out, inputs, g):
    return torch.autograd.grad(out.float(), inputs, g)


@pytest.mark.parametrize("shape", [dict(S=64, T=64, D=64), dict(S=37, T=37, D=32), dict(S=70, T=70, D=128)])
def test_without_dropout_equals_fp32_softmax_attention(shape):
    S = shape["S"]
    q, k, v = qkv(**shape)
    mask = glm_mask(2, S, seps=(5, 20), lengths=(S, S - 3))
    out = _Attention.apply(q, k, v, mask[:, 0], 0.0)
    ref, ref_inputs = reference(q, k, v, mask)
    assert (out.float() - ref).abs().max() < 0.03
    g = torch.randn_like(ref)
    for ours, theirs in zip(grads(out, (q, k, v), g), torch.autograd.grad(ref, ref_inputs, g), strict=True):
        assert (ours.float() - theirs).abs().max() < 0.03 * theirs.abs().max()


def dropped_probabilities(mask, p, seed, B=2, H=3, S=64):
    """The kernel's dropped-out probabilities: with T == D and v = identity, the output is the probability matrix."""
    q, k, _ = qkv(B=B, H=H, S=S, T=S, D=S)
    eye = torch.eye(S, dtype=torch.bfloat16).expand(B, H, S, S)
    torch.manual_seed(seed)
    return _Attention.apply(q, k, eye, mask[:, 0], p).float(), (q, k)


def test_dropout_in_attention_is_softmax_times_a_reproducible_keep_mask():
    p, mask = 0.25, glm_mask(2, 64)
    probs, (q, k) = dropped_probabilities(mask, p, seed=1)
    clean, _ = reference(q, k, torch.eye(64).expand(2, 3, 64, 64), mask)
    keep = probs > 0
    assert not keep[~mask.expand_as(keep)].any()  # masked keys never get probability
    assert torch.allclose(probs[keep], clean.detach()[keep] / (1 - p), rtol=0.02, atol=1e-3)
    rate = keep[mask.expand_as(keep)].float().mean().item()
    n = int(mask.expand_as(keep).sum())
    assert abs(rate - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    again, _ = dropped_probabilities(mask, p, seed=1)
    other, _ = dropped_probabilities(mask, p, seed=2)
    assert torch.equal(again, probs)
    assert not torch.equal(other > 0, keep)


def test_dropout_gradients_follow_the_forward_mask():
    p, mask = 0.3, glm_mask(2, 64)
    probs, _ = dropped_probabilities(mask, p, seed=7)
    keep = (probs > 0).float()
    q, k, v = qkv(S=64, T=64, D=64)  # same q, k as dropped_probabilities: the same seed gives the same mask
    torch.manual_seed(7)
    out = _Attention.apply(q, k, v, mask[:, 0], p)
    ref, ref_inputs = reference(q, k, v, mask, keep, p)
    assert (out.float() - ref).abs().max() < 0.05
    g = torch.randn_like(ref)
    for ours, theirs in zip(grads(out, (q, k, v), g), torch.autograd.grad(ref, ref_inputs, g), strict=True):
        assert (ours.float() - theirs).abs().max() < 0.03 * theirs.abs().max()


def test_rows_without_visible_keys_give_zeros_not_nan():
    q, k, v = qkv(B=1, S=16, T=16)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    mask[..., 3, :] = False
    out = _Attention.apply(q, k, v, mask[:, 0], 0.1)
    assert torch.isfinite(out.float()).all() and (out[..., 3, :] == 0).all()
    gq, gk, gv = grads(out, (q, k, v), torch.ones(out.shape))
    assert all(torch.isfinite(t.float()).all() for t in (gq, gk, gv)) and (gq[..., 3, :] == 0).all()


def test_attention_takes_the_kernel_only_where_it_applies():
    q, k, v = qkv(B=1, S=8, T=8, D=16)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    # no dropout: SDPA (its fused CPU kernel), the same numbers as the fp32 reference
    ref, _ = reference(q, k, v, mask)
    assert (attention(q, k, v, mask, 0.0).float() - ref).abs().max() < 0.02
    # fp32 inputs are PyTorch's SDPA with its own dropout
    q, k, v = (t.float() for t in (q, k, v))
    torch.manual_seed(5)
    out = attention(q, k, v, mask, 0.5)
    torch.manual_seed(5)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 17, 4096 * 3 + 5])
def test_dropout_module(dtype, n):
    p = 0.2
    drop = Dropout(p).train()
    x = torch.rand(n, dtype=dtype) + 0.5
    x.requires_grad_()
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    assert torch.allclose(y[kept].float(), x[kept].float() / (1 - p), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(g != 0, kept)
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)
    if n > 1000:
        assert abs(kept.float().mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
        # no structure across positions: neighbours and rows of the hash are uncorrelated
        a = kept.float()
        assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()) < 0.05
        assert not torch.equal(a[:4096], a[4096:8192])
    assert torch.equal(drop.eval()(x), x)


def test_dropout_rejects_probability_one_in_the_op():
    with pytest.raises(RuntimeError, match="dropout probability must be in"):
        torch.ops.glmkit_kernels.dropout(torch.ones(4), 1.0, torch.tensor(0))
    assert (Dropout(1.0).train()(torch.ones(4)) == 0).all()  # the module hands p = 1 to PyTorch


def test_glm_training_step_with_dropout_kernels_matches_pytorch_without_dropout():
    """With dropout 0 the model runs SDPA and nn.Dropout's no-op; with p -> 0 the kernels must give the same loss."""
    cfg = GLMConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=100, max_sequence_length=32)
    torch.manual_seed(0)
    model = use_training_kernels(GLM(cfg).train())
    ids = torch.randint(0, 100, (2, 32))
    mask = glm_mask(2, 32, seps=(10, 20), lengths=(32, 30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss0 = F.cross_entropy(model(ids, attention_mask=mask).float().flatten(0, 1), ids.flatten())
        for block in model.blocks:
            block.attn.attend.p = 1e-9  # the kernel path, keeping (almost surely) every probability
        loss1 = F.cross_entropy(model(ids, attention_mask=mask).float().flatten(0, 1), ids.flatten())
    assert abs(loss0.item() - loss1.item()) < 2e-2


def test_activation_checkpointing_replays_the_same_dropout_masks():
    """The recomputed forward draws the same seeds (checkpoint restores the RNG state): identical gradients."""
    cfg = GLMConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=100, max_sequence_length=32)
    torch.manual_seed(0)
    model = use_training_kernels(GLM(cfg).train())
    ids, mask = torch.randint(0, 100, (2, 32)), glm_mask(2, 32, seps=(10, 20), lengths=(32, 32))
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, attention_mask=mask).float().logsumexp(-1).mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
        model.zero_grad()
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def module_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


def test_the_swap_keeps_probabilities_modes_weights_and_the_function():
    cfg = GLMConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=100, max_sequence_length=32, attention_dropout=0.2)
    torch.manual_seed(0)
    model = GLM(cfg).eval()
    ids, mask = torch.randint(0, 100, (2, 32)), glm_mask(2, 32, seps=(10, 20), lengths=(32, 30))
    before, state = model(ids, attention_mask=mask), {k: v.clone() for k, v in model.state_dict().items()}
    assert use_training_kernels(model) is model
    types = module_types(model)
    assert {Dropout, KernelAttention} <= types and not {nn.Dropout, ScaledDotProductAttention} & types
    assert {m.p for m in model.modules() if isinstance(m, KernelAttention)} == {0.2}
    assert {m.p for m in model.modules() if isinstance(m, Dropout)} == {cfg.output_dropout}
    assert not any(m.training for m in model.modules())
    assert model.state_dict().keys() == state.keys() and all(
        torch.equal(model.state_dict()[k], state[k]) for k in state
    )
    torch.testing.assert_close(model(ids, attention_mask=mask), before, atol=0, rtol=0)  # eval: no dropout either way


def test_fit_trains_on_the_kernels(tmp_path):
    torch.manual_seed(0)
    model = GLM(GLMConfig(n_layer=1, n_embd=32, n_head=4, vocab_size=96, max_sequence_length=48))
    assert not {Dropout, KernelAttention} & module_types(model)  # the model alone runs PyTorch's modules
    args = TrainArgs(out_dir=str(tmp_path), max_steps=1, micro_batch_size=2, progress=False, precision="bf16")
    fit(model, args, synthetic_source(), resume=False)
    types = module_types(model)
    assert {Dropout, KernelAttention} <= types and not {nn.Dropout, ScaledDotProductAttention} & types
