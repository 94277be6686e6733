"""ChatGLM-6B (v1), exactly as the THUDM hub ``modeling_chatglm.py`` (final revision) computes it.

Architecture (THUDM/chatglm-6b ``modeling_chatglm.py``: ``GLMBlock``, ``SelfAttention``, ``RotaryEmbedding``):
- word embedding only; positions enter as a 2D rotary embedding: each head is split into two halves, the first
  rotated by the position and the second by the block position, each half with the NeoX *rotate-half* pairing
  (element k with k + head_size / 4) and ``inv_freq`` rounded to float16 (the hub builds it with ``.half()``);
- the QKV projection's rows are per-head interleaved: row ``h·3d + t·d + i`` is head h, t ∈ (q, k, v), dim i;
- a DeepNorm-like residual that adds the *normalized* input, scaled: ``h = LN(x); x = h·α + f(h)``;
- a tanh-GELU MLP of ``inner_hidden_size`` with biases; a final LayerNorm; an untied ``lm_head`` without bias;
- masks: the prompt ``text [gMASK] <sop>`` is bidirectional up to ``<sop>``, causal from ``<sop>`` on
  (masks.chatglm6b_inputs); masked scores are -10000 in the hub, so a query row that sees nothing attends
  uniformly to every key, which we reproduce instead of producing NaN.

``forward`` takes the hub ``ChatGLMForConditionalGeneration`` conventions (position_ids ``[B, 2, S]``, a bool
``[B, 1, S, S]`` mask with True = masked); ``cached_forward`` is glmkit's convention (True = may attend), which
generation and serving call. This file holds the network and its hub names; loading lives in hub.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, SpecialTokens
from ..kv_cache import KVCache
from ..masks import chatglm6b_inputs, mask_with_cache
from .base import HubModel

# The hub GLMBlock's default num_layers=28 is never overridden by ChatGLMModel, so α = sqrt(2·28) for every depth
# (chatglm.cpp hard-codes it too); sqrt(2·num_layers) moves a 2-layer model's logits by ~3.
ALPHA = math.sqrt(2 * 28)

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, 1, S, head_size]


@dataclass
class ChatGLM6BConfig:
    """Shape of a ChatGLM-6B model; defaults are THUDM/chatglm-6b's (final revision, vocabulary 130528).

    Attributes:
        n_layer / n_embd / n_head: hub ``num_layers`` / ``hidden_size`` / ``num_attention_heads``; the head size is
            ``n_embd / n_head`` (the hub's ``hidden_size_per_attention_head``) and must be divisible by 4.
        inner_hidden_size: width of the MLP.
        vocab_size: rows of the word embedding and of ``lm_head``.
        max_sequence_length: the context the model was trained for (prompt and answer together).
        layernorm_eps: hub ``layernorm_epsilon``.
        bos_token_id / eos_token_id: ``<sop>`` (starts the answer) / ``<eop>`` (ends it).
        mask_token_id / gmask_token_id / pad_token_id: ``[MASK]``, ``[gMASK]``, ``<pad>``.
    """

    family: ClassVar[str] = "chatglm6b"  # its glmkit.prompts layout: `text [gMASK]`, <sop> fed by the engine

    n_layer: int = 28
    n_embd: int = 4096
    n_head: int = 32
    inner_hidden_size: int = 16384
    vocab_size: int = 130528
    max_sequence_length: int = 2048
    layernorm_eps: float = 1e-5
    bos_token_id: int = 130004
    eos_token_id: int = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int = 3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "layernorm_eps":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                    raise ConfigError(f"layernorm_eps: expected a small positive float, got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and not f.name.endswith("_id")):
                raise ConfigError(f"{f.name}: expected a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"num_attention_heads: {self.n_head} heads do not divide hidden_size={self.n_embd}")
        if self.head_size % 4:
            raise ConfigError(
                f"num_attention_heads: the head size hidden_size / num_attention_heads = {self.head_size} must be "
                "divisible by 4 (two rotary halves of rotate-half pairs)"
            )
        ids = {n: getattr(self, n) for n in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id")}
        for name, v in {**ids, "pad_token_id": self.pad_token_id}.items():
            if v >= self.vocab_size:
                raise ConfigError(f"{name}: id {v} is outside the vocabulary (vocab_size={self.vocab_size})")
        if len(set(ids.values())) != len(ids):
            raise ConfigError(f"token ids: <sop>, <eop>, [MASK] and [gMASK] must be distinct ids, got {ids}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_positions(self) -> int:
        """The longest prompt: positions rotate, so there is no table, only the trained context."""
        return self.max_sequence_length

    @property
    def special_tokens(self) -> SpecialTokens:
        """The ids generation and serving use: ``<sop>`` opens the answer, ``<eop>`` (the hub's eos) ends it.
        ChatGLM-6B has no [CLS] and its configs name no [sMASK]."""
        return SpecialTokens(
            eos=self.eos_token_id,
            pad=self.pad_token_id,
            cls=None,
            mask=self.mask_token_id,
            sop=self.bos_token_id,
            eop=self.eos_token_id,
            gmask=self.gmask_token_id,
        )

    def num_parameters(self) -> int:
        h, i, v = self.n_embd, self.inner_hidden_size, self.vocab_size
        per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)
        return 2 * v * h + self.n_layer * per_layer + 2 * h

    # ---- hub config.json ---------------------------------------------------------------------------------

    def to_hub_dict(self) -> dict[str, Any]:
        return {
            "model_type": "chatglm",
            "architectures": ["ChatGLMModel"],
            **{hub: getattr(self, f) for hub, f in _HUB_TO_FIELD.items()},
            "position_encoding_2d": True,
            "use_cache": True,
        }

    @classmethod
    def from_hub_dict(cls, d: dict[str, Any], **overrides: Any) -> ChatGLM6BConfig:
        """Build from a THUDM/chatglm-6b ``config.json`` dict; unknown or unsupported fields raise ``ConfigError``
        naming the field and what was expected. ``overrides`` replace fields (glmkit names). ``quantization_bit`` is
        the loader's business (chatglm/hub.py): the network is the same."""
        if not isinstance(d, dict):
            raise ConfigError(f"expected a hub config (a JSON object), found {type(d).__name__}")
        unknown = sorted(set(d) - set(_HUB_TO_FIELD) - set(_HUB_CHECKED) - _HUB_IGNORED)
        if unknown:
            raise ConfigError(
                f"unknown ChatGLM-6B config field(s) {unknown}; expected the keys of THUDM/chatglm-6b's config.json"
            )
        if d.get("model_type", "chatglm") != "chatglm":
            raise ConfigError(f"model_type: expected 'chatglm', got {d['model_type']!r}")
        for key, (ok, expected) in _HUB_CHECKED.items():
            if key in d and not ok(d[key]):
                raise ConfigError(f"{key}: expected {expected}, got {d[key]!r}")
        missing = [k for k in _HUB_REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"missing required ChatGLM-6B config field(s) {missing}")
        kwargs = {f: d[hub] for hub, f in _HUB_TO_FIELD.items() if hub in d}
        bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if bad:
            raise ConfigError(f"overrides: unknown ChatGLM6BConfig field(s) {bad}")
        try:
            return cls(**{**kwargs, **overrides})
        except ConfigError as e:  # name the hub key, not ours
            field = str(e).split(":", 1)[0]
            hub = {f: h for h, f in _HUB_TO_FIELD.items()}.get(field, field)
            raise ConfigError(f"{hub}{str(e)[len(field) :]}") from e


_HUB_TO_FIELD = {
    "num_layers": "n_layer",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "inner_hidden_size": "inner_hidden_size",
    "vocab_size": "vocab_size",
    "max_sequence_length": "max_sequence_length",
    "layernorm_epsilon": "layernorm_eps",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "mask_token_id": "mask_token_id",
    "gmask_token_id": "gmask_token_id",
    "pad_token_id": "pad_token_id",
}
_HUB_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "vocab_size")
# a P-tuning run's folder holds its prefix only: the base model loads here, the prefix onto it
_PTUNING = "a P-tuning v2 prefix loads onto the base model with glmkit.finetune.peft.load_prefix"
# Fields the hub code reads that select variants glmkit does not run: each must have its plain value.
_HUB_CHECKED = {
    "position_encoding_2d": (lambda v: v is True, "true (the 1-D rotary branch is used by no released checkpoint)"),
    "pre_seq_len": (lambda v: v in (None, 0), f"null ({_PTUNING})"),
    "prefix_projection": (lambda v: v in (None, False), f"false ({_PTUNING})"),
    "quantization_bit": (lambda v: v in (None, 0, 4, 8), "0, 4 or 8"),
    "quantization_embeddings": (lambda v: v in (None, False), "false (quantized embeddings are not supported)"),
}
# HF plumbing that does not change the math; glmkit_quantization is the loader's (a ``glmkit quantize`` output).
_HUB_IGNORED = {
    "architectures", "auto_map", "torch_dtype", "transformers_version", "use_cache", "_name_or_path", "model_type",
    "glmkit_quantization",
}  # fmt: skip


# ---- rotary positions ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _inv_freq(half: int, device: torch.device) -> torch.Tensor:
    # the hub's RotaryEmbedding(dim=half): computed in fp32, then stored as float16; the rounded values stay in use
    # after the model is cast to fp32 (dropping the rounding moves logits by ~1e-4). A normal tensor even when first
    # made under inference_mode, so that training can use it too.
    with torch.inference_mode(False):
        freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))
        return freq.half().float()


def rotary_2d_half(position_ids: torch.Tensor, head_size: int) -> Rope:
    """cos/sin ``[B, 1, S, head_size]`` of ChatGLM-6B's 2D rotary embedding for ``position_ids [B, 2, S]``: the first
    half of a head turns by the position, the second by the block position; within a half, element ``k`` and
    ``k + head_size / 4`` form a pair turned by ``inv_freq[k]`` (``emb = cat(freqs, freqs)``, the NeoX layout)."""
    angle = position_ids.float()[..., None] * _inv_freq(head_size // 2, position_ids.device)  # [B, 2, S, hs/4]
    angle = torch.cat((angle, angle), dim=-1)  # [B, 2, S, hs/2]
    angle = torch.cat((angle[:, 0], angle[:, 1]), dim=-1)[:, None]  # [B, 1, S, hs]
    return angle.cos(), angle.sin()


def apply_rotary_half(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` on each half of the heads of ``x [B, nh, S, head_size]``."""
    cos, sin = (t.to(x.dtype) for t in rope)
    pairs = x.unflatten(-1, (2, 2, x.shape[-1] // 4))  # [..., half, first/second of the pair, k]
    rotated = torch.stack((-pairs[..., 1, :], pairs[..., 0, :]), dim=-2).flatten(-3)
    return x * cos + rotated * sin


# ---- network -----------------------------------------------------------------------------------------------


def _attend_in_fp32(x: torch.Tensor) -> bool:
    # on a CPU, half-precision attention is ~10x slower than fp32 at decode shapes (generate/fast.py)
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


class Attention(nn.Module):
    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_size
        inner = config.n_head * config.head_size
        self.qkv = nn.Linear(config.n_embd, 3 * inner)
        self.proj = nn.Linear(inner, config.n_embd)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache, layer: int, rope: Rope, blind: torch.Tensor | None
    ) -> torch.Tensor:
        B, S, _ = x.shape
        qkv = self.qkv(x)
        qkv = qkv.float() if _attend_in_fp32(qkv) else qkv
        # per-head interleaved rows: [head, q|k|v, dim]
        q, k, v = qkv.view(B, S, self.n_head, 3, self.head_size).permute(3, 0, 2, 1, 4).unbind(0)
        q, k = apply_rotary_half(q, rope), apply_rotary_half(k, rope)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, S, self.n_head * self.head_size).to(x.dtype)
        if blind is not None:  # the hub's -10000 fill makes every score of such a row equal: the mean of the values
            y = torch.where(blind, v.mean(dim=2).flatten(1)[:, None].to(y.dtype), y)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.inner_hidden_size)
        self.proj = nn.Linear(config.inner_hidden_size, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.n_embd, eps=config.layernorm_eps)
        self.attn = Attention(config)
        self.norm_2 = nn.LayerNorm(config.n_embd, eps=config.layernorm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache, layer: int, rope: Rope, blind: torch.Tensor | None
    ) -> torch.Tensor:
        h = self.norm_1(x)
        x = h * ALPHA + self.attn(h, mask, cache, layer, rope, blind)
        m = self.norm_2(x)
        return m * ALPHA + self.mlp(m)


class ChatGLM6B(HubModel):
    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layernorm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, Rope]:
        return self.wte(input_ids), rotary_2d_half(position_ids, self.config.head_size)

    def cached_forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache=None,
        hidden: bool = False,
        lengths: list[int] | None = None,
        blind: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """glmkit's convention (generate/fast.py ``cached_forward``), without input checks: valid ``position_ids
        [B, 2, S]``, a bool ``attention_mask [B, 1, S, cached + S]`` with True = *may attend* in which every query
        sees a key (``None``: every key), ``cache`` a ``KVCache`` (or rows of one). ``lengths`` (valid tokens of
        right-padded rows) is accepted for the engine's sake; padding is computed and masked. ``blind [B, S, 1]``
        marks query rows the hub masks entirely: they average the values of every key, as the hub's do."""
        S = input_ids.shape[1]
        if cache is not None:
            cache.check_room(S)
        x, rope = self.embed(input_ids, position_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, attention_mask, cache, i, rope, blind)
        if cache is not None:
            cache.advance(S)
        x = self.ln_f(x)
        return x if hidden else self.lm_head(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits ``[B, S, V]``, called like the hub ``ChatGLMForConditionalGeneration``.

        Args:
            input_ids: ``[B, S]``, e.g. ``text [gMASK] <sop>`` (what the ChatGLM-6B tokenizer returns).
            position_ids: ``[B, 2, S]`` = stack(position, block position). Default: derived from ``input_ids`` as
                the hub ``get_position_ids`` does (masks.chatglm6b_inputs); needed once the cache holds tokens.
            attention_mask: bool ``[B, 1, S, S]`` (or ``[B, 1, S, cached + S]`` with a cache), **True = masked**, as
                the hub tokenizer returns it. Default: the hub ``get_masks`` of ``input_ids`` (the prefix up to
                ``<sop>`` bidirectional, causal from ``<sop>``); with cached tokens, every cached token is visible
                and the new ones are causal (one new token: the hub's decode step).
            cache: a ``KVCache``: the new tokens' keys/values are appended and its lengths advanced.
            return_hidden: the final hidden states ``[B, S, C]`` instead of logits.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a [B, S] tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
        B, S = input_ids.shape
        cfg, device = self.config, input_ids.device
        if S == 0 or int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size:
            raise ValueError(f"input_ids: token ids must be in [0, {cfg.vocab_size}) and S > 0")
        cached = cache.host_lengths() if cache is not None else [0] * B
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache: holds {cache.batch_size} rows, input has {B}")
        derived = None
        if position_ids is None or (attention_mask is None and max(cached) == 0):
            derived = chatglm6b_inputs(
                input_ids, sop_id=cfg.bos_token_id, mask_id=cfg.mask_token_id, gmask_id=cfg.gmask_token_id
            )
        if position_ids is None:
            if max(cached) > 0:
                raise ValueError(
                    "position_ids: needed once the cache holds tokens (new tokens sit at the blank's position with "
                    "the next block positions, which input_ids alone do not tell)"
                )
            position_ids = derived[0]
        if position_ids.shape != (B, 2, S):
            raise ValueError(f"position_ids: expected shape [B={B}, 2, S={S}], got {tuple(position_ids.shape)}")
        if int(position_ids.min()) < 0:
            raise ValueError(f"position_ids: must be non-negative, got {int(position_ids.min())}")
        T = max(cached) + S
        if attention_mask is None:
            visible = derived[1] if max(cached) == 0 else torch.ones(S, S, device=device).tril().bool()[None, None]
        else:
            m = torch.as_tensor(attention_mask, device=device)
            if m.dim() != 4 or m.shape[0] not in (1, B) or m.shape[1] != 1 or m.shape[2:] not in ((S, S), (S, T)):
                raise ValueError(
                    f"attention_mask: expected a bool [B, 1, {S}, {S}]"
                    + (f" or [B, 1, {S}, {T}]" if T != S else "")
                    + f" mask (True = masked), got shape {tuple(m.shape)}"
                )
            visible = ~(m if m.dtype == torch.bool else m != 0)
        if max(cached) > 0 and visible.shape[-1] == S:
            visible = mask_with_cache(visible, cached, B)
        visible = visible.expand(B, 1, S, visible.shape[-1])
        blind = ~visible.any(-1)[:, 0, :, None]  # [B, S, 1]
        visible = visible | blind[:, None]  # any key, so that no row is NaN on its way to the override
        blind = blind if bool(blind.any()) else None
        return self.cached_forward(input_ids, position_ids, visible.contiguous(), cache, return_hidden, blind=blind)


# ---- hub weight names -----------------------------------------------------------------------------------------


def hub_key_map(config: ChatGLM6BConfig) -> dict[str, str]:
    """Hub key of THUDM/chatglm-6b → glmkit parameter name (the block names are GLM's)."""
    from ..checkpoint import hub_block_keys

    return {
        "transformer.word_embeddings.weight": "wte.weight",
        "transformer.final_layernorm.weight": "ln_f.weight",
        "transformer.final_layernorm.bias": "ln_f.bias",
        "lm_head.weight": "lm_head.weight",
        **hub_block_keys(config.n_layer),
    }


def is_ignored_hub_key(key: str) -> bool:
    """Buffers the hub checkpoints carry that the hub code itself ignores on load (``RotaryEmbedding``'s
    ``_load_from_state_dict`` is a no-op; the fp16-rounded values are rebuilt)."""
    return key.startswith("transformer.layers.") and key.endswith(".attention.rotary_emb.inv_freq")
