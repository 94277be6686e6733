"""The lean cached forward of generation, and ``optimize_for_decode``: what makes GLM decoding fast on a CPU.

A decode step multiplies one activation row per sequence by every weight matrix, so it is bound by how fast the
weights stream from memory (benchmarks/RESULTS.md, "Generation"); everything else in the step is overhead to cut
(gpt-fast's approach):

- ``GLM.forward`` validates its inputs (min/max reductions read back to the host) and normalises a general mask.
  The engine builds its inputs itself, valid by construction, so ``cached_forward`` skips that and calls the
  model's own modules directly; ``GLM.forward`` is unchanged for every other caller.
- Rows of equal length (one prompt, the beams of a prompt, equal prompts) need no attention mask at all.
- On this CPU the bf16 attention kernels are ~10x slower than the fp32 ones at decode shapes, so a half-precision
  model attends in fp32. Where the fused step below runs, it reads a bf16 KV cache itself (a bf16 model's keys and
  values are bf16 already; 32 rows of 160 tokens: ~8 ms less per GLM-Large step); elsewhere the cache is fp32
  (``cache_dtype``): converting a bf16 cache every step would cost more than reading the wider one.
- ``DecodeStep`` is the one-token step generation and serving run. For a bf16 GLM, ChatGLM-6B or ChatGLM2/3/GLM-4
  on the kernels' CPU it runs every block in one C++ call (``glmkit_kernels::decode_blocks``: the same LayerNorm or
  RMSNorm, GELU or SwiGLU and residual adds, the kernels' matmuls, attention over each row's cache of its KV heads in
  a loop), which removes the ~3 ms of per-op Python dispatch a GLM-Large step otherwise spends around its ~15 ms of
  weight streaming; rows may hold different numbers of tokens.
- ``optimize_for_decode`` swaps the linear layers and the tied LM head of a bf16 or fp32 model for
  ``glmkit.kernels``' GEMV modules (the stock bf16 and fp32 GEMVs reach a fraction of the memory bandwidth). It is
  applied from outside: model.py stays the network only, and the swapped model computes the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..chatglm.v1 import ALPHA, ChatGLM6B, rotary_2d_half
from ..chatglm.v2 import ChatGLM2, rope_angles
from ..kernels.layout import (
    DECODE_META_PER_BLOCK,
    DECODE_TENSORS_PER_BLOCK,
    INT4_GROUP_SIZES,
    MAX_HEAD_SIZE,
    LinearKind,
)
from ..kv_cache import KVCache, KVCacheRows
from ..masks import mask_with_cache
from ..model import GLM, Block, Rope
from ..quantize.modules import QuantizedLinear
from ..rotary import angles_2d

# (input_ids, position_ids, attention_mask, cache, hidden[, lengths]) -> logits, or final hidden states when hidden;
# lengths: valid tokens per right-padded row (cached_forward)
Forward = Callable[..., torch.Tensor]


def _fp32_attention(model: torch.nn.Module) -> bool:
    p = next(model.parameters())
    return type(model) is GLM and p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16)


def cache_dtype(model: torch.nn.Module, compile: bool | str = False) -> torch.dtype:
    """The dtype of the KV cache the engine allocates for ``model``: bf16 where the fused step runs (it reads the
    cache in bf16: half the bytes, and a bf16 model's keys and values are bf16 anyway), fp32 where
    ``cached_forward`` attends in fp32 (a compiled step always does), else the model's dtype."""
    p = next(model.parameters())
    if p.dtype == torch.bfloat16 and _fp32_attention(model) and model.config.head_size <= MAX_HEAD_SIZE:
        if kernels.available(p.device) and not compile:
            return torch.bfloat16
    return torch.float32 if _fp32_attention(model) else p.dtype


class _Unpadded:
    """Right-padded rows ``[B, S, ...]`` as their valid tokens only, ``[N, ...]``: LayerNorms, linears and the MLP
    run on real tokens alone (a batch of ragged prompts wastes no work on padding); attention unpacks to rows."""

    def __init__(self, lengths: list[int], S: int, device: torch.device) -> None:
        self.B, self.S = len(lengths), S
        self.index = torch.cat([torch.arange(b * S, b * S + n, device=device) for b, n in enumerate(lengths)])

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.B * self.S, t.shape[-1]).index_select(0, self.index)

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        full = t.new_zeros(self.B * self.S, t.shape[-1]).index_copy_(0, self.index, t)
        return full.view(self.B, self.S, t.shape[-1])


def _block(
    block: Block,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    cache,
    layer: int,
    fp32_attention: bool,
    rope: Rope | None,
    rows: _Unpadded | None,
) -> torch.Tensor:
    """``Block.forward`` in eval mode; attention in fp32 when ``fp32_attention``; ``x`` packed by ``rows`` if given."""
    attn = block.attn
    qkv = attn.qkv(block.norm_1(x))
    qkv = qkv.float() if fp32_attention else qkv  # one cast for q, k and v
    if rows is not None:
        qkv = rows.unpack(qkv)
    B, S, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, S, attn.n_head, attn.head_size).transpose(1, 2) for t in qkv.split(C, dim=-1))
    if rope is not None:
        q, k = kernels.rotary(q, *rope), kernels.rotary(k, *rope)
    k, v = cache.write(layer, k, v)  # (B, nh, T, hs)
    y = kernels.attention(q, k, v, mask, x.dtype)  # (B, S, C)
    x = x + attn.proj(y if rows is None else rows.pack(y))
    mlp = block.mlp
    return x + mlp.proj(kernels.gelu(mlp.fc(block.norm_2(x)), mlp.approximate))


def cached_forward(
    model: GLM,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache,
    hidden: bool = False,
    lengths: list[int] | None = None,
) -> torch.Tensor:
    """``GLM.forward`` of new tokens appended to ``cache`` (a ``KVCache`` or rows of one), without its input checks.

    Args:
        position_ids: valid ``[B, 2, S]`` positions.
        attention_mask: a boolean ``[B, 1, S, cached + S]`` mask in which every query sees at least one key, or
            ``None`` for one new token per row that sees every cached token (rows of equal length).
        hidden: return the final hidden states instead of the logits.
        lengths: the new tokens of row ``b`` are its first ``lengths[b]`` (right padding, which ``attention_mask``
            hides): the token-wise layers then skip the padding, whose outputs come back as zeros.
    """
    assert attention_mask is not None or input_ids.shape[1] == 1, "a mask is needed for several new tokens"
    B, S = input_ids.shape
    cache.check_room(S)
    x, rope = model.embed(input_ids, position_ids)
    rows = _Unpadded(lengths, S, x.device) if lengths is not None and min(lengths) < S else None
    if rows is not None:
        x = rows.pack(x)
    fp32 = _fp32_attention(model)
    for i, block in enumerate(model.blocks):
        x = _block(block, x, attention_mask, cache, i, fp32, rope, rows)
    cache.advance(S)
    x = model.ln_f(x)
    x = x if hidden else model.lm_head(x, model.wte)
    return x if rows is None else rows.unpack(x)


def forward_for(model: torch.nn.Module) -> Forward:
    """The cached forward the engine uses for ``model``: ``cached_forward`` for a GLM in eval mode, the model's own
    ``cached_forward`` method where it has one (ChatGLM-6B, whose ``forward`` takes the hub's masks, True = masked),
    else a call of the module itself (wrappers, test doubles), which must accept ``GLM.forward``'s arguments."""
    if type(model) is GLM and not model.training:
        return lambda ids, pos, mask, cache, hidden=False, lengths=None: cached_forward(
            model, ids, pos, mask, cache, hidden, lengths
        )
    if callable(getattr(model, "cached_forward", None)):
        return model.cached_forward
    return lambda ids, pos, mask, cache, hidden=False, lengths=None: model(
        ids, pos, mask, cache=cache, return_hidden=hidden
    )


@dataclass
class _FusedBlocks:
    """The arguments of ``decode_blocks`` for a model's blocks: ``DECODE_TENSORS_PER_BLOCK`` tensors and
    ``DECODE_META_PER_BLOCK`` ints per block (glmkit/kernels/layout.py)."""

    tensors: list[torch.Tensor]
    meta: list[int]
    n_head: int
    eps: float
    activation: str  # decode_blocks: GELU's approximate ("tanh" or "none"), or "swiglu"
    qkv_per_head: bool = False  # ChatGLM-6B's QKV rows: q, k, v of each head in turn (else Q | K | V blocks)
    rope_halves: int = 0  # rotate-half pairs within this many segments of a head (ChatGLM-6B: 2), else adjacent pairs
    residual_alpha: float = 0.0  # ChatGLM-6B's LN(x) * alpha + f(LN(x)); 0: x + f(LN(x))


def _fused_linear(module: nn.Module) -> tuple[list[torch.Tensor], list[int]] | None:
    """(weight, scales, bias), empty tensors for "none", and (kind, group size); None if the op cannot run it."""
    none = torch.empty(0)
    if isinstance(module, QuantizedLinear):
        w, s, b = module.weight, module.weight_scale, module.bias
        ok = s.dtype in (torch.float32, torch.bfloat16) and s.is_contiguous()
        ok = ok and (module.bits == 8 or module.group_size in INT4_GROUP_SIZES)
        if module.bits == 8:
            kind, group = LinearKind.INT8, 0
        else:
            kind, group = LinearKind.INT4X16 if module.interleaved else LinearKind.INT4, module.group_size
    elif type(module) in (nn.Linear, kernels.FastLinear) and module.weight.dtype == torch.bfloat16:
        packed = getattr(module, "packed", None)  # in the scales' place: every batch multiplies with the panels
        w, s, b, ok = module.weight, none if packed is None else packed, module.bias, True
        kind, group = LinearKind.BF16, 0
    else:
        return None
    ok = ok and w.is_contiguous() and (b is None or (b.dtype in (torch.float32, torch.bfloat16) and b.is_contiguous()))
    return ([w, s, none if b is None else b], [int(kind), group]) if ok else None


def _fused_style(model: torch.nn.Module) -> str | None:
    """``decode_blocks``' activation for ``model``'s blocks, or None where the op cannot run them."""
    p = next(model.parameters())
    if model.training or p.dtype != torch.bfloat16 or not kernels.available(p.device):
        return None
    if type(model) is GLM:
        ok = _fp32_attention(model) and model.config.head_size <= MAX_HEAD_SIZE
        return model.blocks[0].mlp.approximate if ok else None
    if type(model) is ChatGLM2:  # grouped (blocked) QKV rows, pre-LN residuals, no P-tuning prefix
        c = model.config
        ok = c.multi_query_attention and not c.apply_residual_connection_post_layernorm and not c.pre_seq_len
        return "swiglu" if ok and c.head_size <= MAX_HEAD_SIZE else None
    if type(model) is ChatGLM6B:  # GELU (tanh) MLP, per-head QKV rows, rotate-half 2D rotary, alpha residuals
        return "tanh" if model.config.head_size <= MAX_HEAD_SIZE else None
    return None


def _fused_blocks(model: torch.nn.Module) -> _FusedBlocks | None:
    """The fused op's view of ``model``, or None where it does not run (not a bf16 GLM, ChatGLM-6B or ChatGLM2 on
    the kernels' CPU, or a layer the op does not take)."""
    activation = _fused_style(model)
    if activation is None:
        return None
    tensors: list[torch.Tensor] = []
    meta: list[int] = []
    none = torch.empty(0, dtype=torch.bfloat16)
    for block in model.blocks:
        for norm in (block.norm_1, block.norm_2):  # LayerNorm (weight, bias) or RMSNorm (weight, none)
            bias = getattr(norm, "bias", None)
            kind_ok = type(norm) is nn.RMSNorm or (type(norm) is nn.LayerNorm and bias is not None)
            if not kind_ok or norm.weight is None or norm.weight.dtype != torch.bfloat16:
                return None
            tensors += [norm.weight, none if bias is None else bias]
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            entry = _fused_linear(linear)
            if entry is None:
                return None
            tensors += entry[0]
            meta += entry[1]
    n = len(model.blocks)
    assert len(tensors) == DECODE_TENSORS_PER_BLOCK * n and len(meta) == DECODE_META_PER_BLOCK * n  # layout.py
    first = model.blocks[0]
    fused = _FusedBlocks(tensors, meta, first.attn.n_head, first.norm_1.eps, activation)
    if type(model) is ChatGLM6B:
        fused.qkv_per_head, fused.rope_halves, fused.residual_alpha = True, 2, ALPHA
    return fused


def _rope_rows(model: torch.nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """``decode_blocks``' rope rows ``[N, 2, head_size / 2]`` (cos, sin of each pair's angle) for ``positions
    [N, 2, 1]`` (GLM's rotary, ChatGLM-6B) or ``[N, 1]`` (ChatGLM2), computed as the model's Python path does."""
    if type(model) is GLM:  # cos, sin [N, 1, 1, head_size / 2] -> [N, 2, head_size / 2]
        return torch.cat(angles_2d(positions, model.config.head_size), dim=2).flatten(1, 2).contiguous()
    if type(model) is ChatGLM6B:  # cos, sin [N, 1, 1, D] repeat each half's D / 4 angles: one per rotate-half pair
        N, D = len(positions), model.config.head_size
        cos, sin = (t.view(N, 2, 2, D // 4)[:, :, 0].flatten(1) for t in rotary_2d_half(positions, D))
        return torch.stack([cos, sin], dim=1).contiguous()
    # ChatGLM2: 1-D rotary on each head's first rotary_dims; the table turns the other pairs by 0. The Python path
    # turns in the model's dtype (v2.rotate_pairs), so the table holds bf16 values
    cos, sin = (t.flatten(1) for t in rope_angles(positions, model.config))
    pad = model.config.head_size // 2 - cos.shape[1]
    rope = torch.stack([F.pad(cos, (0, pad), value=1.0), F.pad(sin, (0, pad), value=0.0)], dim=1)
    return rope.bfloat16().float().contiguous()


class _RopeTable:
    """``_rope_rows`` by lookup in rows computed once for positions 0..P-1 (P doubled when a position passes it):
    computing them costs ~10 dispatched ops, ~0.5 ms of every decode step. A 2D-position model's first half of pairs
    turns by the position, the second by the block position, so its rows are looked up per half."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.two_d = model, type(model) is not ChatGLM2
        self.rows = torch.empty(0)

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= len(self.rows):
            p = torch.arange(max(256, 2 * int(positions.max()) + 1))
            self.rows = _rope_rows(self.model, torch.stack([p, p], 1)[..., None] if self.two_d else p[:, None])
        if not self.two_d:
            return self.rows[positions[:, 0]]
        half = self.rows.shape[-1] // 2
        return torch.cat([self.rows[positions[:, 0, 0], :, :half], self.rows[positions[:, 1, 0], :, half:]], dim=-1)


def _slots(cache) -> tuple[KVCache, list[int]] | None:
    """The fp32 or bf16 pool and the rows ``cache`` stands for, when the fused op can write to them in place."""
    if isinstance(cache, KVCacheRows):
        pool, slots = cache.pool, cache.slots
    elif isinstance(cache, KVCache):
        pool, slots = cache, list(range(cache.batch_size))
    else:
        return None
    ok = pool.k.dtype in (torch.float32, torch.bfloat16) and pool.k.is_contiguous() and pool.v.is_contiguous()
    return (pool, slots) if ok else None


def _final_norm(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
    """The kernels' ``norm`` arguments for ``model.ln_f`` (a bf16 LayerNorm with bias or RMSNorm), else None."""
    ln = model.ln_f
    bias = getattr(ln, "bias", None)
    ok = (type(ln) is nn.LayerNorm and bias is not None) or type(ln) is nn.RMSNorm
    ok = ok and ln.weight is not None and ln.weight.dtype == torch.bfloat16 and ln.eps is not None
    return (ln.weight, bias, float(ln.eps)) if ok else None


class DecodeStep:
    """One new token per row, each row attending to every token its cache row holds (rows may differ in length):
    the step of generation (``GLMStepper``) and of serving (``ModelRunner``). Returns logits ``[N, V]`` (or the
    final hidden states with ``hidden``) and advances the cache by one token.

    A bf16 GLM on the kernels' CPU runs in ``decode_blocks``; anything else (fp32, CUDA, wrappers, a compiled
    step) in ``cached_forward`` with the ragged-length mask built here, outside any compiled code: per-row
    lengths as Python ints inside a compiled forward would recompile it every step."""

    def __init__(self, model: torch.nn.Module, compile: bool | str = False) -> None:
        self.model = model
        self.forward = forward_for(model)
        if compile:
            self.forward = torch.compile(self.forward, backend="inductor" if compile is True else compile, dynamic=True)
        self.fused = None if compile else _fused_blocks(model)
        learned = type(model) is GLM and model.wpe is not None  # position tables, no rotary
        self.rope = None if self.fused is None or learned else _RopeTable(model)
        self.final_norm = _final_norm(model) if self.fused is not None else None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, hidden: bool = False) -> torch.Tensor:
        """``tokens [N, 1]``, ``positions [N, 2, 1]`` (GLM) or ``[N, 1]`` (ChatGLM2)."""
        rows = _slots(cache) if self.fused is not None and not torch.is_grad_enabled() else None
        lengths = cache.host_lengths()
        if rows is None:
            mask = None
            if min(lengths) != max(lengths):
                one = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=tokens.device)
                mask = mask_with_cache(one, lengths, len(tokens))
            return self.forward(tokens, positions, mask, cache, hidden)[:, -1]
        model, f = self.model, self.fused
        cache.check_room(1)
        if self.rope is None:  # GLM's learned position tables
            x, rope = model.embed(tokens, positions)[0][:, 0], None
        else:
            x, rope = model.wte(tokens)[:, 0], self.rope(positions)
        pool, slots = rows
        op = torch.ops.glmkit_kernels.decode_blocks.default
        x = op(
            x, f.tensors, f.meta, pool.k, pool.v, slots, lengths, rope, f.n_head, f.eps, f.activation,
            f.qkv_per_head, f.rope_halves, f.residual_alpha,
        )  # fmt: skip
        cache.advance(1)
        if self.final_norm is None:
            x = model.ln_f(x)
        else:
            x = torch.ops.glmkit_kernels.norm.default(x, *self.final_norm)
        if hidden:
            return x
        return model.lm_head(x, model.wte) if type(model) is GLM else model.lm_head(x)


def optimize_for_decode(model: torch.nn.Module, pack: bool = False) -> torch.nn.Module:
    """Put ``model`` in eval mode and, for bf16 or fp32 weights where ``glmkit.kernels`` runs, swap its linear
    layers and tied LM head for the kernels' GEMV modules (in place, same tensors); returns it.

    ``pack``: also keep a copy of every bf16 weight packed in panels (``kernels.pack_weight``), which every batch
    multiplies with (as fast as the GEMV at 1 row, 1.6x the matmuls at 32) at twice the weight memory — for servers.
    Other dtypes and machines keep the stock layers (no compiler, a CPU without AVX2, CUDA).
    """
    p = next(model.parameters())
    if p.dtype in (torch.bfloat16, torch.float32) and kernels.available(p.device):
        kernels.replace_linear(model)
        if pack:
            kernels.pack_linear(model)
    return model.eval()
