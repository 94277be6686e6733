"""The original GLM (Du et al., ACL 2022, arXiv 2103.10360), exactly as released by THUDM.

Architecture choices (the paper's section 2; THUDM/GLM ``model/modeling_glm.py`` and ``mpu/transformer.py``):
- input = word embedding + position embedding + block-position embedding (the 2D positional encoding);
  positions are added only here, so cached keys/values never change (see kv_cache.py). With
  ``position_encoding="rotary_2d_interleaved"`` (glmkit's variant, rotary.py) there are no tables: queries and keys
  are rotated by (position, block position) instead, keys before they are cached, so cached keys still never change;
- pre-LN GPT-2/Megatron blocks with a fused QKV projection (rows Q | K | V, head-major);
- masked attention scores are -65504 in the reference; with a boolean mask and at least one visible key per
  row this is exactly softmax with -inf, so we use ``scaled_dot_product_attention``;
- GELU in its tanh form (the original training code) or erf form (the hub modeling_glm.py);
- final LayerNorm and an LM head tied to the word embeddings, without bias.

This file holds the network only: masks come from masks.py, weights from checkpoint.py, decoding from generate/.
Faster kernels are swapped in from outside, module by module, and compute the same function: ``glmkit.kernels``'
attention and dropout for CPU training (``kernels.training.use_training_kernels``, which the training loop calls)
and its GEMVs for decoding (``generate.fast.optimize_for_decode``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import GLMConfig
from .kv_cache import KVCache
from .masks import mask_with_cache, normalize_attention_mask
from .rotary import Rope, angles_2d, apply_interleaved


class ScaledDotProductAttention(nn.Module):
    """``softmax(q kᵀ / √d, masked) → dropout(p) → @ v`` (``F.scaled_dot_product_attention``; dropout only in training).
    A module without parameters of its own, so that training code can swap in another kernel from outside."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)


class Attention(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_size
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attend = ScaledDotProductAttention(config.attention_dropout)
        self.resid_dropout = nn.Dropout(config.output_dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, layer: int, rope: Rope | None = None
    ) -> torch.Tensor:
        B, S, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, S, self.n_head, self.head_size).transpose(1, 2) for t in (q, k, v))  # (B, nh, S, hs)
        if rope is not None:
            q, k = apply_interleaved(q, rope), apply_interleaved(k, rope)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, nh, T, hs)
        y = self.attend(q, k, v, mask)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, S, C)))


class MLP(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"
        self.dropout = nn.Dropout(config.output_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.n_embd, eps=config.layernorm_eps)
        self.attn = Attention(config)
        self.norm_2 = nn.LayerNorm(config.n_embd, eps=config.layernorm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, layer: int, rope: Rope | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), mask, cache, layer, rope)
        return x + self.mlp(self.norm_2(x))


class TiedLMHead(nn.Module):
    """Logits against the word embeddings (tied weights, no bias). A module without parameters of its own, so that
    inference code can swap in another kernel from outside (glmkit.kernels, glmkit.quantize)."""

    def forward(self, x: torch.Tensor, wte: nn.Module) -> torch.Tensor:
        return F.linear(x, wte.weight)


class GLM(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        learned = config.position_encoding == "learned"
        self.wpe = nn.Embedding(config.n_positions, config.n_embd) if learned else None
        with_block = learned and config.block_position_encoding
        self.wbpe = nn.Embedding(config.n_positions, config.n_embd) if with_block else None
        self.drop = nn.Dropout(config.embedding_dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layernorm_eps)
        self.lm_head = TiedLMHead()
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self, reference: bool = False) -> None:
        """GLM's init: N(0, σ) weights, output projections scaled by 1/sqrt(2·n_layer), zero biases
        (docs/glm-notes.md, "Architecture") — except the block-position table, which starts at zero. The reference
        draws it from N(0, σ) too, but its row 0 is then one random vector added to every Part-A token, as large as
        its own word embedding; at small scale that costs ~0.25 nats after 300 steps against starting from zero
        (benchmarks/RESULTS.md).
        ``reference=True`` draws it as the reference does."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2.0 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias") or (name.startswith("wbpe") and not reference):
                nn.init.zeros_(p)
            elif ".norm_" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    @classmethod
    def from_pretrained(
        cls,
        path,
        config: GLMConfig | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        **config_overrides,
    ) -> GLM:
        """Load a checkpoint folder in the THUDM hub or Megatron layout (``checkpoint.load_pretrained``).

        ``config_overrides`` replace config fields, e.g. ``gelu="erf"`` to run exactly what the hub code runs.
        """
        from .checkpoint import load_pretrained

        return load_pretrained(path, config=config, dtype=dtype, device=device, **config_overrides)

    def save_pretrained(self, path, metadata: dict[str, str] | None = None) -> None:
        """Write the hub layout (``config.json`` + ``model.safetensors``, hub key names) atomically."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, metadata)

    def generate(self, input_ids, **kwargs) -> torch.Tensor:
        """``transformers``' ``model.generate(input_ids, max_new_tokens=..., ...)``: ``glmkit.generate.generate`` with
        the same arguments, returning its ``sequences [R, P + T]`` (prompt, ``<sop>``, new tokens) as transformers does.
        Like every glmkit decoding entry point it puts the model on glmkit's kernels first (``kernels=False``: not)."""
        from .generate import generate

        return generate(self, input_ids, **kwargs).sequences

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, Rope | None]:
        """The blocks' input for valid ``position_ids [B, 2, S]``, and the rotary angles when positions rotate."""
        x = self.wte(input_ids)
        if self.wpe is None:
            return x, angles_2d(position_ids, self.config.head_size)
        x = x + self.wpe(position_ids[:, 0])
        if self.wbpe is not None:
            x = x + self.wbpe(position_ids[:, 1])
        return x, None

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: int | torch.Tensor | Sequence[int] | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        logits_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, S, V]`` for ``input_ids [B, S]`` (the hub ``GLMModel`` calling convention).

        Args:
            input_ids: token ids ``[B, S]``.
            position_ids: ``[B, 2, S]`` = stack(position, block position); default ``arange(S)`` and blocks 0.
                With a cache, new tokens usually continue their blank's position with the next block index.
            attention_mask: the Part-A length ``sep`` (scalar or ``[B]``; ``None`` means 0, i.e. causal) or an
                explicit 0/1 mask ``[B, 1, S, S]``. With a cache, a ``[B, 1, S, cached + S]`` mask is also
                accepted; an ``S``-wide mask or ``sep`` covers the new tokens and every cached token is visible.
            cache: a ``KVCache``; the new tokens' keys/values are appended to it and its lengths advanced.
            return_hidden: return the final hidden states ``[B, S, C]`` instead of logits.
            logits_mask: a boolean ``[B, S]``; when given, only the selected positions get logits, returned as
                ``[N, V]`` in row-major order (training needs them only on Part B: most of the LM head is skipped).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [B, S], got {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        cfg = self.config
        device = input_ids.device
        cached = cache.host_lengths() if cache is not None else [0] * B
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache: holds {cache.batch_size} rows, input has {B}")
            cache.check_room(S)
        if position_ids is None:
            if max(cached) + S > cfg.n_positions or min(cached) != max(cached):
                raise ValueError(
                    f"position_ids: needed for {max(cached) + S} tokens (the position table has {cfg.n_positions}"
                    f" rows, max_sequence_length={cfg.max_sequence_length}) or for rows of different lengths"
                )
            pos = torch.arange(cached[0], cached[0] + S, device=device)
            position_ids = torch.stack([pos, torch.zeros_like(pos)])[None].expand(B, 2, S)
        if position_ids.shape != (B, 2, S):
            raise ValueError(f"position_ids: expected shape [B={B}, 2, S={S}], got {tuple(position_ids.shape)}")
        if int(position_ids.max()) >= cfg.n_positions or int(position_ids.min()) < 0:
            raise ValueError(
                f"position_ids: values must be in [0, {cfg.max_sequence_length}] (max_sequence_length), "
                f"got [{int(position_ids.min())}, {int(position_ids.max())}]"
            )
        if int(input_ids.max()) >= cfg.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"input_ids: token ids must be in [0, {cfg.vocab_size}), got {int(input_ids.max())}")

        mask = normalize_attention_mask(attention_mask, B, S, max(cached) + S, device=device)
        if cache is not None and mask.shape[-1] == S and max(cached) > 0:
            mask = mask_with_cache(mask, cached, B)
        mask = mask.expand(B, 1, S, mask.shape[-1])
        # a query row that sees nothing would give NaN in SDPA; the reference gives it a uniform average instead
        mask = mask | ~mask.any(-1, keepdim=True)

        x, rope = self.embed(input_ids, position_ids)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, None, i, rope, use_reentrant=False)
            else:
                x = block(x, mask, cache, i, rope)
        if cache is not None:
            cache.advance(S)
        if logits_mask is not None:
            x = x[logits_mask]
        x = self.ln_f(x)
        if return_hidden:
            return x
        return self.lm_head(x, self.wte)
