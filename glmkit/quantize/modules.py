"""Quantized modules and the swaps that put them into a GLM from outside (gpt-fast's runtime module swap).

``quantize_model`` quantizes a loaded float model in place; ``convert_for_runtime`` gives a (meta) model the empty
quantized modules a quantized checkpoint's tensors are assigned to. Both swap ``nn.Linear`` → ``QuantizedLinear``
and, with ``embeddings``, ``wte`` → ``QuantizedEmbedding`` and the tied head → ``QuantizedTiedHead`` (without, the
head that stays in high precision moves to the bf16 kernel, ``FastTiedHead``); model.py is untouched. The integer
weight sits where the float one was, under the same name (``weight``), next to ``weight_scale``: the hub layout of
ChatGLM's quantized checkpoints (``quantization.py`` of the hub's THUDM/chatglm-6b-int4 and chatglm2-6b-int4).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import FastLinear, FastTiedHead, linear_int4, linear_int4x16, linear_int8
from ..kernels.layout import INT4_BLOCK_ROWS as B
from ..kernels.reference import (
    deinterleave_int4,
    dequantize_int4,
    dequantize_int8,
    dequantize_nibbles,
    int4x16_rows,
    interleave_int4,
)
from ..model import GLM, TiedLMHead
from .core import quantize_int4, quantize_int8
from .scheme import QuantScheme


class _QuantizedWeight(nn.Module):
    """An integer ``weight`` with its ``weight_scale``: int8 ``[N, K]`` + ``[N]``, or int4 ``uint8 [N, K/2]`` +
    ``[N, K/group]``. Scales are made in bf16 and then follow the model's float dtype (``.to(dtype)``).

    An int4 weight with ``N % 16 == 0`` is held in memory 16 rows interleaved (``interleaved``; see
    kernels/reference.py), the layout the int4 kernel runs fastest on: ``weight uint8 [N / 16, 8 K]`` and
    ``weight_scale [N / 16, K / group, 16]``. The state dict keeps the checkpoint layout above: converted when
    saved and when loaded (``interleave_state_`` converts a checkpoint's own tensors in place)."""

    def __init__(self, n: int, k: int, scheme: QuantScheme, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.bits, self.group_size = scheme.bits, scheme.group_size
        self.rows, self.interleaved = n, scheme.bits == 4 and n % B == 0
        if scheme.bits == 8:
            self.register_buffer("weight", torch.empty(n, k, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.empty(n, dtype=torch.bfloat16, device=device))
        elif self.interleaved:
            self.register_buffer("weight", torch.empty(n // B, B // 2 * k, dtype=torch.uint8, device=device))
            ng = k // scheme.group_size
            self.register_buffer("weight_scale", torch.empty(n // B, ng, B, dtype=torch.bfloat16, device=device))
        else:
            self.register_buffer("weight", torch.empty(n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer(
                "weight_scale", torch.empty(n, k // scheme.group_size, dtype=torch.bfloat16, device=device)
            )

    def set_from(self, weight: torch.Tensor) -> None:
        q, s = quantize_int8(weight) if self.bits == 8 else quantize_int4(weight, self.group_size)
        q, s = q.to(weight.device), s.to(weight.device)
        self.weight, self.weight_scale = interleave_int4(q, s) if self.interleaved else (q, s)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.bits == 8:
            return linear_int8(x, self.weight, self.weight_scale, bias)
        if self.interleaved:
            return linear_int4x16(x, self.weight, self.weight_scale, self.group_size, bias)
        return linear_int4(x, self.weight, self.weight_scale, self.group_size, bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.interleaved:
            w, s = deinterleave_int4(self.weight.detach(), self.weight_scale.detach())
            destination[prefix + "weight"], destination[prefix + "weight_scale"] = w, s

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        w, s = state_dict.get(prefix + "weight"), state_dict.get(prefix + "weight_scale")
        if self.interleaved and w is not None and s is not None and w.dim() == 2 and w.shape[0] == self.rows:
            state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = interleave_int4(w, s)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QuantizedLinear(_QuantizedWeight):
    """Weight-only quantized ``nn.Linear``: integer weight, float bias, output in the input's dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        scheme: QuantScheme,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(out_features, in_features, scheme, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, bits={self.bits}, group_size={self.group_size}, interleaved={self.interleaved}"


def interleave_state_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Interleave, in place, the int4 weights in ``state`` (checkpoint layout, tensors the caller owns) that
    ``model``'s quantized modules hold interleaved: loading then needs no second copy of them."""
    for name, module in model.named_modules():
        if isinstance(module, _QuantizedWeight) and module.interleaved:
            w, s = f"{name}.weight", f"{name}.weight_scale"
            if w in state and s in state and state[w].is_contiguous() and state[s].is_contiguous():
                state[w], state[s] = interleave_int4(state[w], state[s], in_place=True)


class QuantizedEmbedding(_QuantizedWeight):
    """Word embeddings quantized per vocabulary row; lookups dequantize the rows they gather (in the scale's dtype),
    and ``linear`` serves the tied LM head from the same integers."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, scheme: QuantScheme, device: torch.device | str | None = None
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, scheme, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.interleaved:
            u, scales = int4x16_rows(self.weight, self.weight_scale, flat)
            out = dequantize_nibbles(u, scales, self.group_size, self.weight_scale.dtype)
            return out.view(*ids.shape, self.embedding_dim)
        rows, scales = F.embedding(flat, self.weight), F.embedding(flat, self.weight_scale.view(self.rows, -1))
        if self.bits == 8:
            out = dequantize_int8(rows, scales.view(-1), self.weight_scale.dtype)
        else:
            out = dequantize_int4(rows, scales, self.group_size, self.weight_scale.dtype)
        return out.view(*ids.shape, self.embedding_dim)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class QuantizedTiedHead(TiedLMHead):
    def forward(self, x: torch.Tensor, wte: nn.Module) -> torch.Tensor:
        return wte.linear(x)


def _targets(model: GLM, scheme: QuantScheme) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every module the scheme quantizes, checked against its widths first."""
    out = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}".lstrip(".")
            if type(child) in (nn.Linear, FastLinear):  # FastLinear: a model already put on the decode kernels
                scheme.check_width(full, child.in_features)
                out.append((parent, name, child))
            elif parent is model and (name == "lm_head" or (scheme.embeddings and name == "wte")):
                if name == "wte":
                    scheme.check_width("wte (the word embeddings / tied LM head; the hidden size)", child.embedding_dim)
                out.append((parent, name, child))
    return out


def _swap(model: GLM, scheme: QuantScheme, quantize: bool) -> GLM:
    for parent, name, child in _targets(model, scheme):
        if isinstance(child, nn.Linear):
            w = child.state_dict()["weight"]  # a released FastLinear's weight is in its panels only
            new = QuantizedLinear(
                child.in_features, child.out_features, child.bias is not None, scheme, w.device, w.dtype
            )
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
        elif isinstance(child, nn.Embedding):
            w = child.weight
            new = QuantizedEmbedding(child.num_embeddings, child.embedding_dim, scheme, w.device)
        else:  # the tied head: on the quantized embeddings, else on the bf16 kernel like every other matmul
            setattr(parent, name, QuantizedTiedHead() if scheme.embeddings else FastTiedHead())
            continue
        if quantize:
            new.set_from(w)
        setattr(parent, name, new)
    return model


def quantize_model(model: GLM, scheme: QuantScheme) -> GLM:
    """Quantize a float GLM in place; returns it."""
    return _swap(model, scheme, quantize=True)


def convert_for_runtime(model: GLM, scheme: QuantScheme) -> GLM:
    """Give ``model`` (usually on the meta device) the empty quantized modules of ``scheme``; returns it."""
    return _swap(model, scheme, quantize=False)


def scheme_of(model: nn.Module) -> QuantScheme | None:
    """The scheme a model was quantized with (from its modules), or ``None`` for a float model."""
    found = [m for m in model.modules() if isinstance(m, _QuantizedWeight)]
    if not found:
        return None
    first = found[0]
    if any((m.bits, m.group_size) != (first.bits, first.group_size) for m in found):
        raise ValueError("the model mixes quantization schemes; glmkit checkpoints record one scheme per model")
    return QuantScheme(first.bits, first.group_size, any(isinstance(m, QuantizedEmbedding) for m in found))
