"""Drop-in modules that route a model's matmuls through glmkit.kernels, swapped in from outside the model.

``FastLinear`` is an ``nn.Linear`` (same parameters, same state dict) whose forward uses the GEMV kernels, and
``FastTiedHead`` does the same for GLM's tied LM head. ``replace_linear`` swaps them into a model in place, sharing
the existing tensors, so the swapped model computes the same function and saves and loads exactly as before.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import TiedLMHead
from .ops import linear, linear_packed, pack_weight


def _packed_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The packed copy serves fp32 / bf16 inputs without autograd (it does not track the weight)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return x.dtype in (torch.float32, torch.bfloat16) and x.is_cpu and not grad


class FastLinear(nn.Linear):
    """``nn.Linear`` for inference on ``glmkit.kernels.linear`` (bf16 and fp32 weights on the kernels).

    ``packed``: an optional copy of a bf16 weight in panels (``pack_linear``) that every batch multiplies with; it is
    not part of the state dict."""

    packed: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, module: nn.Linear) -> FastLinear:
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and _packed_fits(x, self.weight):
            return linear_packed(x, self.packed, self.out_features, self.bias)
        return linear(x, self.weight, self.bias)


class FastTiedHead(TiedLMHead):
    """The tied LM head on the GEMV kernels (the vocabulary GEMV is the largest matmul of a decode step)."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, wte: nn.Module) -> torch.Tensor:
        if self.packed is not None and _packed_fits(x, wte.weight):
            return linear_packed(x, self.packed, wte.weight.shape[0])
        return linear(x, wte.weight)


def pack_linear(model: nn.Module) -> int:
    """Give every bf16 ``FastLinear`` and ``FastTiedHead`` of ``model`` (after ``replace_linear``) a prepacked copy of
    its weight for batched matmuls (twice the weight memory; for inference: the copy does not follow later changes of
    the weight); returns how many were packed (0 where the kernels do not run)."""
    n = 0
    for module in model.modules():
        if isinstance(module, FastLinear) and (module.bias is None or module.bias.dtype == torch.bfloat16):
            module.packed = pack_weight(module.weight)
        elif isinstance(module, FastTiedHead) and isinstance(getattr(model, "wte", None), nn.Embedding):
            module.packed = pack_weight(model.wte.weight)
        else:
            continue
        n += module.packed is not None
    return n


def replace_linear(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for ``FastLinear`` and a tied head for ``FastTiedHead``, in place."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, FastLinear.from_linear(child))
            elif type(child) is TiedLMHead:
                setattr(parent, name, FastTiedHead())
    return model
