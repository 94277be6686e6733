"""Drop-in modules that route a model's matmuls through glmkit.kernels, swapped in from outside the model.

``FastLinear`` is an ``nn.Linear`` (same parameters, same state dict) whose forward uses the GEMV kernels, and
``FastTiedHead`` does the same for GLM's tied LM head. ``replace_linear`` swaps them into a model in place, sharing
the existing tensors, so the swapped model computes the same function and saves and loads exactly as before.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import TiedLMHead
from .ops import linear, linear_packed, pack_weight, unpack_weight


def _packed_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The packed copy serves fp32 / bf16 inputs without autograd (it does not track the weight)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return x.dtype in (torch.float32, torch.bfloat16) and x.is_cpu and not grad


class FastLinear(nn.Linear):
    """``nn.Linear`` for inference on ``glmkit.kernels.linear`` (bf16 and fp32 weights on the kernels).

    ``packed``: an optional copy of a bf16 weight in panels (``pack_linear``) that every batch multiplies with; it is
    not part of the state dict. Once ``released``, the panels are the only copy: ``weight`` is an empty ``[N, 0]``
    stand-in, and the state dict, loading and autograd rebuild the ``[N, K]`` weight from the panels."""

    packed: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, module: nn.Linear) -> FastLinear:
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
        return new

    @property
    def released(self) -> bool:
        return self.packed is not None and self.weight.shape[-1] != self.in_features

    def release(self) -> None:
        """Keep the weight in panels only (half the memory of both); the module then serves inference."""
        if self.packed is not None and not self.released:
            self.weight = nn.Parameter(self.weight.new_empty(self.out_features, 0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and _packed_fits(x, self.weight):
            return linear_packed(x, self.packed, self.out_features, self.bias)
        return linear(x, unpack_weight(self.packed, self.out_features) if self.released else self.weight, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.released:
            destination[prefix + "weight"] = unpack_weight(self.packed, self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        w = state_dict.get(prefix + "weight")
        if self.released and w is not None and w.shape == (self.out_features, self.in_features):
            packed = pack_weight(w.to(self.weight.dtype))
            if packed is not None:
                self.packed = packed
                state_dict[prefix + "weight"] = self.weight  # the stand-in, so the parameter copy below fits
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FastTiedHead(TiedLMHead):
    """The tied LM head on the GEMV kernels (the vocabulary GEMV is the largest matmul of a decode step)."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, wte: nn.Module) -> torch.Tensor:
        if self.packed is not None and _packed_fits(x, wte.weight):
            return linear_packed(x, self.packed, wte.weight.shape[0])
        return linear(x, wte.weight)


def pack_linear(model: nn.Module, release: bool = False) -> int:
    """Give every bf16 ``FastLinear`` and ``FastTiedHead`` of ``model`` (after ``replace_linear``) a copy of its
    weight packed in panels for batched matmuls; returns how many were packed (0 where the kernels do not run).

    The copy does not follow later changes of the weight (for inference). It doubles the weight memory unless
    ``release``: then each ``FastLinear`` keeps its weight in panels only (``FastLinear.release``); the tied head's
    copy stays beside the embedding, which lookups read."""
    n = 0
    for module in model.modules():
        if isinstance(module, FastLinear) and (module.bias is None or module.bias.dtype == torch.bfloat16):
            if module.released:
                n += 1
                continue
            module.packed = pack_weight(module.weight)
            if release:
                module.release()
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
