"""Drop-in modules that route a model's matmuls through glmkit.kernels, swapped in from outside the model.

``FastLinear`` is an ``nn.Linear`` (same parameters, same state dict) whose forward uses the GEMV kernels, and
``FastTiedHead`` does the same for GLM's tied LM head. ``replace_linear`` swaps them into a model in place, sharing
the existing tensors, so the swapped model computes the same function and saves and loads exactly as before.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import TiedLMHead
from .ops import linear


class FastLinear(nn.Linear):
    """``nn.Linear`` for inference on ``glmkit.kernels.linear`` (bf16 and fp32 weights on the kernels)."""

    @classmethod
    def from_linear(cls, module: nn.Linear) -> FastLinear:
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class FastTiedHead(TiedLMHead):
    """The tied LM head on the GEMV kernels (the vocabulary GEMV is the largest matmul of a decode step)."""

    def forward(self, x: torch.Tensor, wte: nn.Module) -> torch.Tensor:
        return linear(x, wte.weight)


def replace_linear(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for ``FastLinear`` and a tied head for ``FastTiedHead``, in place."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, FastLinear.from_linear(child))
            elif type(child) is TiedLMHead:
                setattr(parent, name, FastTiedHead())
    return model
