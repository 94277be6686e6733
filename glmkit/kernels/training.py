"""Attention and dropout for training on CPU with glmkit's C++ kernels (csrc/train.cpp); elsewhere, PyTorch's.

SDPA has no CPU kernel with dropout, so at the paper's dropout rates PyTorch runs attention as a chain of ATen
passes over ``[batch, heads, S, T]`` tensors and draws every dropout mask from one sequential generator; both are
most of a CPU training step's time beyond the matmuls (benchmarks/RESULTS.md). Here:

- ``attention``: the two matmuls stay ``torch.bmm`` in bf16 (what autocast runs), and one C++ pass in between
  masks, takes the softmax in fp32 and drops probabilities out; the backward pass recomputes the probabilities
  from the saved log-sum-exp and regenerates the dropout mask, so nothing ``[S, T]``-sized is kept between passes.
- ``Dropout``: ``nn.Dropout`` whose mask is a hash of (seed, position): nothing stored, both cores used.

Each call draws its seed from PyTorch's default CPU generator, so ``torch.manual_seed`` and saved RNG states
(exact resume) govern these masks as they do PyTorch's; the masks themselves differ from PyTorch's.
``use_training_kernels`` swaps them into a model from outside (the training loop calls it; model.py stays the
network only). Used only where they apply (CPU, training with dropout > 0, bf16 attention, kernels built);
otherwise the PyTorch ops run.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import ScaledDotProductAttention
from . import build


def _seed() -> torch.Tensor:
    # a tensor, not an int: reading it on the host would break a torch.compile graph at every call
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def register_fakes() -> None:
    """Output shapes of the training ops for torch.compile's tracing (build.load() calls this once it loaded them)."""
    torch.library.register_fake("glmkit_kernels::attention_probs_")(
        lambda scores, mask, scale, p, seed: scores.new_empty(scores.shape[:2], dtype=torch.float32)
    )
    torch.library.register_fake("glmkit_kernels::attention_probs_backward_")(lambda *args: None)
    torch.library.register_fake("glmkit_kernels::dropout")(lambda x, p, seed: torch.empty_like(x))


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, p: float):
        B, H, S, D = q.shape
        q, k, v = (t.reshape(B * H, -1, D) for t in (q, k, v))
        scale, seed = 1.0 / math.sqrt(D), _seed()
        probs = torch.bmm(q, k.transpose(1, 2))
        lse = torch.ops.glmkit_kernels.attention_probs_(probs, mask, scale, p, seed)
        out = torch.bmm(probs, v)
        ctx.save_for_backward(q, k, v, out, lse, mask, seed)
        ctx.p, ctx.scale, ctx.shape = p, scale, (B, H, S, D)
        return out.view(B, H, S, D)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask, seed = ctx.saved_tensors
        B, H, S, D = ctx.shape
        grad_out = grad_out.reshape(B * H, S, D).to(torch.bfloat16)
        delta = (grad_out.float() * out.float()).sum(-1)
        probs = torch.bmm(q, k.transpose(1, 2))
        grad = torch.bmm(grad_out, v.transpose(1, 2))
        torch.ops.glmkit_kernels.attention_probs_backward_(probs, grad, lse, delta, mask, ctx.scale, ctx.p, seed)
        dq = torch.bmm(grad, k).view(B, H, S, D)
        dk = torch.bmm(grad.transpose(1, 2), q).view(B, H, -1, D)
        dv = torch.bmm(probs.transpose(1, 2), grad_out).view(B, H, -1, D)
        return dq, dk, dv, None, None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """``softmax(q kᵀ / √d, masked) → dropout → @ v`` for ``q [B, H, S, D]``, ``k, v [B, H, T, D]`` and a boolean
    ``mask [B or 1, 1, S, T]`` (True = visible); the semantics of ``F.scaled_dot_product_attention``."""
    use_kernel = (
        dropout_p > 0
        and q.is_cpu
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and mask.dtype == torch.bool
        and mask.dim() == 4
        and mask.shape[1] == 1
        and build.load()
    )
    if not use_kernel:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    m = mask[:, 0]
    if m.stride(-1) != 1 or m.stride(-2) != m.shape[-1]:
        m = m.contiguous()
    return _Attention.apply(q, k, v, m, float(dropout_p))


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        seed = _seed()
        ctx.p = p
        ctx.save_for_backward(seed)
        return torch.ops.glmkit_kernels.dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        return torch.ops.glmkit_kernels.dropout(grad.contiguous(), ctx.p, seed), None


class Dropout(nn.Dropout):
    """``nn.Dropout`` on the C++ kernels for fp32 / bf16 CPU tensors in training (a hashed mask, see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = x.is_cpu and x.dtype in (torch.float32, torch.bfloat16)
        if self.training and 0 < self.p < 1 and fast and build.load():
            return _Dropout.apply(x, float(self.p))
        return super().forward(x)


class KernelAttention(ScaledDotProductAttention):
    """The model's attention module on ``attention`` above: the kernels in CPU training with dropout, else SDPA."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, mask, self.p if self.training else 0.0)


def use_training_kernels(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Dropout`` of ``model`` for ``Dropout`` and every ``ScaledDotProductAttention`` for
    ``KernelAttention``, in place (same probabilities, same train/eval mode, no parameters touched): the same
    function, with dropout masks drawn by the kernels' hash instead of PyTorch's generator."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                new = Dropout(child.p, child.inplace)
            elif type(child) is ScaledDotProductAttention:
                new = KernelAttention(child.p)
            else:
                continue
            setattr(parent, name, new.train(child.training))
    return model
