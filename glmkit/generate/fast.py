"""The lean cached forward of generation, and ``optimize_for_decode``: what makes GLM decoding fast on a CPU.

A decode step multiplies one activation row per sequence by every weight matrix, so it is bound by how fast the
weights stream from memory (cpu-notes.md); everything else in the step is overhead to cut (gpt-fast's approach):

- ``GLM.forward`` validates its inputs (min/max reductions read back to the host) and normalises a general mask.
  The engine builds its inputs itself, valid by construction, so ``cached_forward`` skips that and calls the
  model's own modules directly; ``GLM.forward`` is unchanged for every other caller.
- Rows of equal length (one prompt, the beams of a prompt, equal prompts) need no attention mask at all.
- On this CPU the bf16 attention kernels are ~10x slower than the fp32 ones at decode shapes, so a half-precision
  model attends in fp32, over a KV cache the engine keeps in fp32 (``cache_dtype``): converting a bf16 cache every
  step would cost more than reading the wider one.
- ``optimize_for_decode`` swaps the linear layers and the tied LM head of a bf16 model for ``glmkit.kernels``'
  weight-only GEMV modules (the stock bf16 GEMV reaches a fraction of the memory bandwidth). It is applied from
  outside: model.py stays the network only, and the swapped model computes the same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kv_cache import KVCache
from ..model import GLM, Block

# (input_ids, position_ids, attention_mask, cache, hidden) -> logits, or final hidden states when hidden
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, object, bool], torch.Tensor]


def _fp32_attention(model: torch.nn.Module) -> bool:
    p = next(model.parameters())
    return type(model) is GLM and p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16)


def cache_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the KV cache the engine allocates for ``model``: fp32 where ``cached_forward`` attends in fp32."""
    p = next(model.parameters())
    return torch.float32 if _fp32_attention(model) else p.dtype


def _block(
    block: Block, x: torch.Tensor, mask: torch.Tensor | None, cache, layer: int, fp32_attention: bool
) -> torch.Tensor:
    """``Block.forward`` in eval mode; attention in fp32 when ``fp32_attention``."""
    attn = block.attn
    B, S, C = x.shape
    qkv = attn.qkv(block.norm_1(x))
    qkv = qkv.float() if fp32_attention else qkv  # one cast for q, k and v
    q, k, v = (t.view(B, S, attn.n_head, attn.head_size).transpose(1, 2) for t in qkv.split(C, dim=-1))
    store = cache.k.dtype if isinstance(cache, KVCache) else x.dtype
    k, v = cache.write(layer, k.to(store), v.to(store))  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask).to(x.dtype)
    x = x + attn.proj(y.transpose(1, 2).reshape(B, S, C))
    return x + block.mlp(block.norm_2(x))


def cached_forward(
    model: GLM,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache,
    hidden: bool = False,
) -> torch.Tensor:
    """``GLM.forward`` of new tokens appended to ``cache`` (a ``KVCache`` or rows of one), without its input checks.

    Args:
        position_ids: valid ``[B, 2, S]`` positions.
        attention_mask: a boolean ``[B, 1, S, cached + S]`` mask in which every query sees at least one key, or
            ``None`` for one new token per row that sees every cached token (rows of equal length).
        hidden: return the final hidden states instead of the logits.
    """
    assert attention_mask is not None or input_ids.shape[1] == 1, "a mask is needed for several new tokens"
    cache.check_room(input_ids.shape[1])
    x = model.wte(input_ids) + model.wpe(position_ids[:, 0])
    if model.wbpe is not None:
        x = x + model.wbpe(position_ids[:, 1])
    fp32 = _fp32_attention(model)
    for i, block in enumerate(model.blocks):
        x = _block(block, x, attention_mask, cache, i, fp32)
    cache.advance(input_ids.shape[1])
    x = model.ln_f(x)
    return x if hidden else model.lm_head(x, model.wte)


def forward_for(model: torch.nn.Module) -> Forward:
    """The cached forward the engine uses for ``model``: ``cached_forward`` for a GLM in eval mode, else a call of
    the module itself (wrappers, test doubles), which must accept ``GLM.forward``'s arguments."""
    if type(model) is GLM and not model.training:
        return lambda ids, pos, mask, cache, hidden=False: cached_forward(model, ids, pos, mask, cache, hidden)
    return lambda ids, pos, mask, cache, hidden=False: model(ids, pos, mask, cache=cache, return_hidden=hidden)


def optimize_for_decode(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode and, for bf16 weights where ``glmkit.kernels`` runs, swap its linear layers and
    tied LM head for the kernels' GEMV modules (in place, same tensors); returns it.

    Other dtypes and machines keep the stock layers (no compiler, a CPU without AVX-512 BF16, CUDA).
    """
    from .. import kernels

    p = next(model.parameters())
    if p.dtype == torch.bfloat16 and kernels.available(p.device):
        kernels.replace_linear(model)
    return model.eval()
