"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B: one decoder-only architecture with config switches.

The math of the THUDM hub ``modeling_chatglm.py`` (THUDM/chatglm2-6b, chatglm3-6b, glm-4-9b), written plainly:
- pre-norm blocks (RMSNorm, or LayerNorm with ``rmsnorm=False``) with plain residuals, or residuals taken after the
  norm with ``apply_residual_connection_post_layernorm``; a final norm when ``post_layer_norm``;
- one fused QKV projection. With ``multi_query_attention`` its rows are blocked ``[Q: heads | K: groups | V: groups]``
  and query head ``h`` reads KV group ``h // (heads / groups)``; without it the rows are interleaved per head
  (``[q_h | k_h | v_h]`` for each head ``h``), as the hub's ``split_tensor_along_last_dim`` reads them;
- RoPE on the first half of each head's ``kv_channels`` dims, rotating the interleaved pairs ``(2i, 2i + 1)`` by
  ``position · base^(-2i / rot)``, base ``10000 · rope_ratio`` (ChatGLM3-32k/128k, GLM-4), or base 10000 at
  ``position / rope_ratio`` (ChatGLM2-6B-32k's position interpolation, ``rope_interpolation``); the other half passes;
- causal attention scaled by ``1 / sqrt(kv_channels)``; keys of left padding are hidden, and padding query rows of a
  prompt see every key (so they stay finite, as in the hub ``get_masks``);
- SwiGLU MLP ``proj(silu(gate) · up)`` with ``fc`` rows ``[gate | up]``, ``ffn_hidden_size`` wide;
- an untied output layer; optional P-tuning v2 prefix keys/values (``pre_seq_len``) in front of every layer's keys.

Keys are rotated before they are cached, so a cache of keys and values (``n_kv_head`` heads only) is exact.
Internal names follow nanoGPT like glmkit/model.py; the hub names live only in hub.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, _json_kind
from ..kv_cache import KVCache
from .base import HubModel

_HUB_TO_FIELD = {
    "num_layers": "n_layer",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "kv_channels": "head_size",
    "multi_query_attention": "multi_query_attention",
    "multi_query_group_num": "multi_query_group_num",
    "ffn_hidden_size": "ffn_hidden_size",
    "padded_vocab_size": "vocab_size",
    "seq_length": "seq_length",
    "layernorm_epsilon": "layernorm_eps",
    "rmsnorm": "rmsnorm",
    "apply_residual_connection_post_layernorm": "apply_residual_connection_post_layernorm",
    "post_layer_norm": "post_layer_norm",
    "add_bias_linear": "add_bias_linear",
    "add_qkv_bias": "add_qkv_bias",
    "rope_ratio": "rope_ratio",
    "pre_seq_len": "pre_seq_len",
    "prefix_projection": "prefix_projection",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
# Hub keys that do not change inference math: HF plumbing, dropout, fp32 switches the hub code applies anyway.
_HUB_IGNORED = {
    "model_type", "architectures", "auto_map", "torch_dtype", "transformers_version", "_name_or_path", "use_cache",
    "hidden_dropout", "attention_dropout", "classifier_dropout", "bias_dropout_fusion", "attn_implementation",
    "apply_query_key_layer_scaling", "attention_softmax_in_fp32", "fp32_residual_connection", "original_rope",
    "tie_word_embeddings", "bos_token_id", "tokenizer_class", "num_hidden_layers", "vocab_size", "quantization_bit",
    "interleaved_qkv", "glmkit_quantization", "glmkit_rope_interpolation",
}  # fmt: skip
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "kv_channels", "ffn_hidden_size", "padded_vocab_size")


@dataclass
class ChatGLM2Config:
    """Shape and switches of a ChatGLM2 / ChatGLM3 / GLM-4 model (hub ``configuration_chatglm.ChatGLMConfig``).

    Attributes:
        n_layer, n_embd, n_head: blocks, hidden size, query heads (hub ``num_layers``, ``hidden_size``,
            ``num_attention_heads``).
        head_size: per-head width (hub ``kv_channels``); ``n_head * head_size`` need not equal ``n_embd``.
        multi_query_attention / multi_query_group_num: grouped KV with that many KV heads; without, every head has
            its own keys (and the QKV rows are interleaved per head).
        ffn_hidden_size: SwiGLU width (``fc`` has twice as many outputs: gate, then up).
        vocab_size: rows of the embedding and output layer (hub ``padded_vocab_size``).
        seq_length: the context the model was built for; positions must stay below it.
        rope_ratio: RoPE base multiplier, base = 10000 · rope_ratio (ChatGLM3, GLM-4).
        rope_interpolation: divide positions by rope_ratio instead, base 10000 (ChatGLM2-6B-32k: its hub code does,
            with the same config keys; read from config.json's ``glmkit_rope_interpolation``, else assumed for a
            ``_name_or_path`` naming chatglm2 with a rope_ratio).
        pre_seq_len / prefix_projection: P-tuning v2 prefix (None: none).
        eos_token_id: stop id(s) (GLM-4 lists three); pad_token_id: the tokenizer's padding id.
    """

    family: ClassVar[str] = "chatglm2"  # its glmkit.prompts layout: `[gMASK] sop text`, continued causally

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    head_size: int = 16
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 96
    vocab_size: int = 320
    seq_length: int = 64
    layernorm_eps: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    rope_ratio: float = 1.0
    rope_interpolation: bool = False
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    eos_token_id: int | list[int] = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        ints = ("n_layer", "n_embd", "n_head", "head_size", "multi_query_group_num", "ffn_hidden_size")
        for name in (*ints, "vocab_size", "seq_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name}: expected a positive int, got {v!r}")
        flags = ("multi_query_attention", "rmsnorm", "apply_residual_connection_post_layernorm", "post_layer_norm")
        for name in (*flags, "add_bias_linear", "add_qkv_bias", "prefix_projection", "rope_interpolation"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.head_size % 4:
            raise ConfigError(
                f"kv_channels: RoPE turns pairs in the first half of a head, so it must be a multiple of 4, "
                f"got {self.head_size}"
            )
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"multi_query_group_num: {self.n_kv_head} KV groups do not divide num_attention_heads={self.n_head}"
            )
        if not isinstance(self.layernorm_eps, (int, float)) or not 0 < self.layernorm_eps < 1:
            raise ConfigError(f"layernorm_epsilon: expected a small positive float, got {self.layernorm_eps!r}")
        if isinstance(self.rope_ratio, bool) or not isinstance(self.rope_ratio, (int, float)) or self.rope_ratio <= 0:
            raise ConfigError(f"rope_ratio: expected a positive number, got {self.rope_ratio!r}")
        p = self.pre_seq_len
        if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p <= 0):
            raise ConfigError(f"pre_seq_len: expected a positive int or null, got {p!r}")
        for name, ids in (("eos_token_id", self.eos_ids), ("pad_token_id", [self.pad_token_id])):
            if not ids or any(
                not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_size for i in ids
            ):
                got = getattr(self, name)
                raise ConfigError(f"{name}: expected token id(s) in [0, {self.vocab_size}), got {got!r}")

    @property
    def n_kv_head(self) -> int:
        """KV heads the cache holds: the groups with multi-query attention, else one per query head."""
        return self.multi_query_group_num if self.multi_query_attention else self.n_head

    @property
    def rotary_dims(self) -> int:
        return self.head_size // 2

    @property
    def max_sequence_length(self) -> int:
        return self.seq_length

    @property
    def n_positions(self) -> int:
        return self.seq_length

    @property
    def eos_ids(self) -> list[int]:
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def special_tokens(self) -> None:
        """No GLM blank tokens: ChatGLM2-style models are causal LMs (the prompt layout lives with the tokenizer)."""
        return None

    def num_parameters(self) -> int:
        h, d, n, g, f = self.n_embd, self.head_size, self.n_head, self.n_kv_head, self.ffn_hidden_size
        qkv = h * (n + 2 * g) * d + (n + 2 * g) * d * (self.add_qkv_bias or self.add_bias_linear)
        norms = h * (1 if self.rmsnorm else 2)
        per_layer = 2 * norms + qkv + n * d * h + 3 * h * f + (h + 2 * f + h) * self.add_bias_linear
        prefix, kv = self.pre_seq_len or 0, self.n_layer * 2 * g * d
        if prefix:
            prefix = prefix * h + h * h + h + h * kv + kv if self.prefix_projection else prefix * kv
        return 2 * self.vocab_size * h + self.n_layer * per_layer + norms * self.post_layer_norm + prefix

    # ---- hub config.json ---------------------------------------------------------------------------------

    def to_hub_dict(self) -> dict[str, Any]:
        return {
            "model_type": "chatglm",
            "architectures": ["ChatGLMModel"],
            **{hub: getattr(self, f) for hub, f in _HUB_TO_FIELD.items()},
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": False,
            **({"glmkit_rope_interpolation": True} if self.rope_interpolation else {}),
        }

    @classmethod
    def from_hub_dict(cls, d: dict[str, Any], **overrides: Any) -> ChatGLM2Config:
        """Build from a hub ``config.json`` dict; unknown or inconsistent fields raise ``ConfigError`` naming them."""
        if not isinstance(d, dict):
            raise ConfigError(f"expected a hub config (a JSON object), found {_json_kind(d)}")
        unknown = sorted(set(d) - set(_HUB_TO_FIELD) - _HUB_IGNORED)
        if unknown:
            raise ConfigError(f"unknown ChatGLM2/3/GLM-4 config field(s) {unknown}")
        if d.get("model_type", "chatglm") != "chatglm":
            raise ConfigError(f"model_type: expected 'chatglm', got {d['model_type']!r}")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"missing required field(s) {missing}")
        if d.get("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings: ChatGLM2/3/GLM-4 have an untied output_layer; expected false")
        for alias, key in (("num_hidden_layers", "num_layers"), ("vocab_size", "padded_vocab_size")):
            if alias in d and d[alias] != d[key]:
                raise ConfigError(f"{alias}: {d[alias]!r} disagrees with {key}={d[key]!r}")
        kwargs = {f: d[hub] for hub, f in _HUB_TO_FIELD.items() if hub in d and d[hub] is not None}
        if "glmkit_rope_interpolation" in d:
            kwargs["rope_interpolation"] = d["glmkit_rope_interpolation"]
        elif d.get("rope_ratio", 1) != 1 and "chatglm2" in str(d.get("_name_or_path", "")).lower():
            kwargs["rope_interpolation"] = True
        bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if bad:
            raise ConfigError(f"overrides: unknown ChatGLM2Config field(s) {bad}")
        try:
            return cls(**{**kwargs, **overrides})
        except ConfigError as e:  # name the hub key the user sees in config.json, not our field
            field, _, rest = str(e).partition(":")
            hub = {f: h for h, f in _HUB_TO_FIELD.items()}.get(field, field)
            raise ConfigError(f"{hub}:{rest}") from e


def _norm(config: ChatGLM2Config) -> nn.Module:
    if config.rmsnorm:
        return nn.RMSNorm(config.n_embd, eps=config.layernorm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layernorm_eps)


def rope_angles(position_ids: torch.Tensor, config: ChatGLM2Config) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, 1, S, rotary_dims / 2]`` for ``position_ids [B, S]`` (fp32, like ChatGLM3/GLM-4)."""
    rot, ratio = config.rotary_dims, config.rope_ratio
    base = 10000.0 if config.rope_interpolation else 10000.0 * ratio
    theta = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32, device=position_ids.device) / rot)
    positions = position_ids.float() / ratio if config.rope_interpolation else position_ids.float()
    angle = positions[:, None, :, None] * theta
    return angle.cos(), angle.sin()


def rotate_pairs(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Turn the pairs ``(x[..., 2i], x[..., 2i + 1])`` of ``x [B, nh, S, 2 * n]`` by ``rope``'s angle ``i``."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.n_kv_head, config.head_size
        self.rot, self.blocked = config.rotary_dims, config.multi_query_attention
        width = (self.n_head + 2 * self.n_kv_head) * self.head_size
        self.qkv = nn.Linear(config.n_embd, width, bias=config.add_bias_linear or config.add_qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=config.add_bias_linear)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None,
        layer: int,
        prefix: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        nh, ng, d = self.n_head, self.n_kv_head, self.head_size
        qkv = self.qkv(x)
        if self.blocked:
            q, k, v = qkv.split([nh * d, ng * d, ng * d], dim=-1)
            q, k, v = (t.view(B, S, -1, d).transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = qkv.view(B, S, nh, 3 * d).transpose(1, 2).split(d, dim=-1)
        q = torch.cat([rotate_pairs(q[..., : self.rot], rope), q[..., self.rot :]], dim=-1)
        k = torch.cat([rotate_pairs(k[..., : self.rot], rope), k[..., self.rot :]], dim=-1)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, ng, T, d)
        if prefix is not None:
            k, v = torch.cat([prefix[0].to(k.dtype), k], dim=2), torch.cat([prefix[1].to(v.dtype), v], dim=2)
        # fp32 softmax as the hub (attention_softmax_in_fp32); SDPA's GQA repeats each group for consecutive heads
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=ng != nh)
        return self.proj(y.to(x.dtype).transpose(1, 2).reshape(B, S, nh * d))


class MLP(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.proj = nn.Linear(config.ffn_hidden_size, config.n_embd, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.norm_1, self.attn = _norm(config), Attention(config)
        self.norm_2, self.mlp = _norm(config), MLP(config)
        self.post_ln_residual = config.apply_residual_connection_post_layernorm

    def forward(self, x, mask, rope, cache, layer, prefix) -> torch.Tensor:
        h = self.norm_1(x)
        x = (h if self.post_ln_residual else x) + self.attn(h, mask, rope, cache, layer, prefix)
        h = self.norm_2(x)
        return (h if self.post_ln_residual else x) + self.mlp(h)


class PrefixEncoder(nn.Module):
    """P-tuning v2: ``pre_seq_len`` learned keys and values for every layer (hub ``PrefixEncoder``), optionally
    through a two-layer tanh MLP (``prefix_projection``)."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.config = config
        kv_size = config.n_layer * 2 * config.n_kv_head * config.head_size
        if config.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.n_embd)
            self.trans = nn.Sequential(
                nn.Linear(config.n_embd, config.n_embd), nn.Tanh(), nn.Linear(config.n_embd, kv_size)
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
            self.trans = None

    def forward(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(k, v)`` of shape ``[batch, n_kv_head, pre_seq_len, head_size]``."""
        c = self.config
        kv = self.embedding.weight if self.trans is None else self.trans(self.embedding.weight)
        # the hub views the last dim as [layer, k|v, group, dim]
        kv = kv.to(dtype).view(c.pre_seq_len, c.n_layer, 2, c.n_kv_head, c.head_size).permute(1, 2, 3, 0, 4)
        return [(layer[0].expand(batch, -1, -1, -1), layer[1].expand(batch, -1, -1, -1)) for layer in kv]


class ChatGLM2(HubModel):
    """ChatGLM2 / ChatGLM3 / GLM-4 (``ChatGLMForConditionalGeneration``'s network). A causal LM: generation continues
    the prompt token by token (glmkit/generate/causal.py)."""

    causal_lm = True

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = _norm(config) if config.post_layer_norm else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def generate(self, input_ids, **kwargs) -> torch.Tensor:
        """``glmkit.generate.generate`` returning transformers' ``sequences`` (prompt, then new tokens)."""
        from ..generate import generate

        return generate(self, input_ids, **kwargs).sequences

    def _mask(
        self, attention_mask: torch.Tensor | None, cached: list[int], B: int, S: int, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean ``[B, 1, S, max(cached) + S]`` (True = visible), or None when plain causal attention is exact."""
        past = max(cached)
        T = past + S
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype != torch.bool or attention_mask.shape[2:] != (S, T):
                raise ValueError(
                    f"attention_mask: a 4-D mask must be boolean [B, 1, {S}, {T}] (True = visible), "
                    f"got {attention_mask.dtype} {tuple(attention_mask.shape)}"
                )
            return attention_mask
        keys = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (S, T):
                raise ValueError(
                    f"attention_mask: expected a 0/1 padding mask [B={B}, {S}]"
                    + (f" or [B, {T}] (cached + new tokens)" if T != S else "")
                    + f", got {tuple(attention_mask.shape)}"
                )
            keys = attention_mask.to(device).bool()
            if keys.shape[1] == S and past:
                keys = torch.cat([keys.new_ones(B, past), keys], dim=1)
            if bool(keys.all()):
                keys = None
        if keys is None and min(cached) == past and S == 1:
            return None  # one new token per row, every cached token visible
        if keys is None and past == 0:
            return torch.ones(S, S, dtype=torch.bool, device=device).tril()[None, None]
        # key j of row b holds its j-th token: visible to new token i iff j <= cached[b] + i
        lengths = torch.tensor(cached, device=device)[:, None, None]
        visible = torch.arange(T, device=device)[None, None, :] <= lengths + torch.arange(S, device=device)[:, None]
        if keys is not None:
            visible = visible & keys[:, None, :]
            if past == 0:  # a padding query row of a prompt sees every key (the hub's get_masks)
                visible = visible | ~keys[:, :, None]
        return visible[:, None]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits ``[B, S, V]`` for ``input_ids [B, S]`` (the hub ``ChatGLMForConditionalGeneration`` convention).

        Args:
            position_ids: ``[B, S]``; default: counting each row's real tokens (``[0] * pad + arange(n)`` for a
                left-padded row, as the hub tokenizer builds them), continuing after each row's cached tokens.
            attention_mask: the hub's 0/1 padding mask ``[B, S]`` (or ``[B, cached + S]`` with a cache; default all
                ones), or glmkit's boolean ``[B, 1, S, cached + S]`` (True = visible).
            cache: a ``KVCache`` of ``n_kv_head`` heads; new keys/values are appended and its lengths advanced.
            return_hidden: return the final hidden states ``[B, S, C]`` instead of logits.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [B, S], got {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        cfg, device = self.config, input_ids.device
        if int(input_ids.max()) >= cfg.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"input_ids: token ids must be in [0, {cfg.vocab_size}), got {int(input_ids.max())}")
        cached = cache.host_lengths() if cache is not None else [0] * B
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache: holds {cache.batch_size} rows, input has {B}")
            cache.check_room(S)
        mask = self._mask(attention_mask, cached, B, S, device)
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                count = attention_mask.to(device).long().cumsum(-1)[:, -S:] - 1
                past = 0 if attention_mask.shape[1] != S else torch.tensor(cached, device=device)[:, None]
                position_ids = (count + past).clamp(min=0)
            else:
                position_ids = torch.tensor(cached, device=device)[:, None] + torch.arange(S, device=device)
        if position_ids.shape != (B, S):
            raise ValueError(f"position_ids: expected shape [B={B}, S={S}], got {tuple(position_ids.shape)}")
        if int(position_ids.max()) >= cfg.seq_length or int(position_ids.min()) < 0:
            raise ValueError(
                f"position_ids: values must be in [0, {cfg.seq_length}) (seq_length), "
                f"got [{int(position_ids.min())}, {int(position_ids.max())}]"
            )
        prefix = None
        if self.prefix_encoder is not None:
            prefix = self.prefix_encoder(B, self.wte.weight.dtype)
            if mask is not None:  # the prefix keys are visible to every token
                mask = torch.cat([mask.new_ones(mask.shape[0], 1, S, cfg.pre_seq_len), mask], dim=-1)

        rope = rope_angles(position_ids.to(device), cfg)
        x = self.wte(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, rope, cache, i, None if prefix is None else prefix[i])
        if cache is not None:
            cache.advance(S)
        x = self.ln_f(x)
        return x if return_hidden else self.lm_head(x)
