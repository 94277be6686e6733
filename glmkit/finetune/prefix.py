"""P-tuning v2 prefixes (Liu et al. 2022; THUDM/ChatGLM-6B ``ptuning/``) on every glmkit model family.

``pre_seq_len`` learned keys and values sit in front of every layer's, from a ``prefix_encoder`` embedding
``[pre_seq_len, n_layer · 2 · kv heads · head_size]`` laid out ``[layer, k|v, head, dim]`` (the hub
``PrefixEncoder``, glmkit/chatglm/v2.py, reused here; THUDM/chatglm-6b's ``get_prompt`` views the same tensor with
its ``num_attention_heads`` as the KV heads). ChatGLM2/3/GLM-4 carry it in the model (hub.py loads checkpoints that
hold it). A GLM (``PrefixTunedGLM``) or a ChatGLM-6B (``PrefixTunedChatGLM6B``) is wrapped, and the wrapper hands
the prefix to attention through the KV-cache interface (``_PrefixedCache``), so training, ``glmkit.generate`` and a
cache filled by earlier steps all see it. The prefix keys take no position (they are not rotated, and the text's
positions are not shifted: THUDM/chatglm-6b ``ChatGLMModel.forward`` derives them from ``input_ids`` alone) and
every query sees them (the hub prepends ``pre_seq_len`` unmasked columns to the attention mask).

``save_prefix`` / ``load_prefix`` read and write the released P-tuning checkpoints' layout:
``transformer.prefix_encoder.*`` tensors only, with a ``config.json`` naming ``pre_seq_len``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..chatglm.v1 import ChatGLM6B
from ..chatglm.v2 import ChatGLM2, PrefixEncoder
from ..checkpoint import CheckpointError, load_state_dict, staged_folder
from ..masks import chatglm6b_inputs, mask_with_cache, normalize_attention_mask
from ..model import GLM

PREFIX_KEY = "prefix_encoder."  # ChatGLM's P-tuning checkpoints: transformer.prefix_encoder.<tensor>


@dataclass(frozen=True)
class PrefixShape:
    """What ``chatglm.v2.PrefixEncoder`` reads from a config: the prefix length and the model's KV shape."""

    pre_seq_len: int
    n_layer: int
    n_kv_head: int
    head_size: int
    n_embd: int
    prefix_projection: bool = False


class _PrefixedCache:
    """A prefix's keys/values in front of every layer's, then those of ``inner`` (the caller's ``KVCache`` or rows
    of one; None for a pass without cache). Attention reads it like a cache that already holds the prefix, so the
    prefix is visible to every token and takes no position; ``inner`` stores only the text's keys."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], inner: Any, batch: int) -> None:
        self.prefix, self.inner, self.batch_size = prefix, inner, batch

    def host_lengths(self) -> list[int]:
        return [self.prefix[0][0].shape[2] + n for n in _cached_lengths(self.inner, self.batch_size)]

    def check_room(self, new_tokens: int) -> None:
        if self.inner is not None:
            self.inner.check_room(new_tokens)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            k, v = self.inner.write(layer, k, v)
        pk, pv = self.prefix[layer]
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)

    def advance(self, new_tokens: int) -> None:
        if self.inner is not None:
            self.inner.advance(new_tokens)


def _cached_lengths(cache: Any, batch: int) -> list[int]:
    """Tokens each row of ``cache`` holds: none for no cache or one that keeps nothing (``PassThroughCache``, the
    scoring pass, which has no lengths)."""
    return cache.host_lengths() if hasattr(cache, "host_lengths") else [0] * batch


def _check_prefix_length(pre_seq_len: int, context: int, what: str) -> None:
    if isinstance(pre_seq_len, bool) or not isinstance(pre_seq_len, int) or pre_seq_len <= 0:
        raise ValueError(f"pre_seq_len: expected a positive int, got {pre_seq_len!r}")
    if pre_seq_len >= context:
        raise ValueError(
            f"pre_seq_len: a prefix of {pre_seq_len} tokens overflows the context of {context} ({what}), leaving no "
            f"room for text; at most {context - 1}"
        )


class _PrefixTuned(nn.Module):
    """A frozen model (``self.model``) and its prefix (``self.prefix_encoder``), whose config leaves the prefix
    room in the context."""

    def __init__(self, model: nn.Module, pre_seq_len: int, prefix_projection: bool, what: str) -> None:
        super().__init__()
        c = model.config
        _check_prefix_length(pre_seq_len, c.n_positions, what)
        self.model = model  # registered first: generation takes the model's dtype from its first parameter
        shape = PrefixShape(pre_seq_len, c.n_layer, c.n_head, c.head_size, c.n_embd, prefix_projection)
        p = next(model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        self.prefix_encoder = PrefixEncoder(shape).to(p.device, dtype)
        self._text_config = dataclasses.replace(c, max_sequence_length=c.max_sequence_length - pre_seq_len)

    @property
    def config(self):
        """The model's config with the context left to text (``max_sequence_length`` less the prefix), so every
        caller that fits a text to ``config.n_positions`` (generation, serving, scoring) leaves the prefix room."""
        return self._text_config

    @property
    def pre_seq_len(self) -> int:
        return self.prefix_encoder.config.pre_seq_len

    @property
    def wte(self) -> nn.Module:  # what callers that run the model's own LM head take (serve's Scorer)
        return self.model.wte

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def _prefixed(self, cache: Any, batch: int) -> _PrefixedCache:
        return _PrefixedCache(self.prefix_encoder(batch, self.prefix_encoder.embedding.weight.dtype), cache, batch)


def _prefix_columns(mask: torch.Tensor, pre_seq_len: int) -> torch.Tensor:
    """A glmkit mask ``[B|1, 1, S, T]`` (True = may attend) with the prefix's keys in front, visible to every query."""
    return torch.cat([mask.new_ones(*mask.shape[:3], pre_seq_len), mask], dim=-1)


class PrefixTunedGLM(_PrefixTuned):
    """A GLM with a P-tuning v2 prefix: ``forward`` takes ``GLM.forward``'s arguments (so ``batch_loss`` and
    ``glmkit.generate`` run it), and the prefix's keys/values sit in front of every layer's through the cache.
    Prefix plus text must fit the context: ``n_positions`` (max_sequence_length + 1), the positions a GLM text
    takes (its Part A; Part B and padding reuse them)."""

    def __init__(self, model: GLM, pre_seq_len: int, prefix_projection: bool = False) -> None:
        super().__init__(model, pre_seq_len, prefix_projection, "max_sequence_length + 1")

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        cache: Any = None,
        return_hidden: bool = False,
        logits_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``GLM.forward`` with the prefix visible to every token; positions count the text only (default
        ``arange`` after the cached text). A full-width mask covers the cached text, not the prefix."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [B, S], got {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        cached = _cached_lengths(cache, B)
        if position_ids is None:
            if min(cached) != max(cached):
                raise ValueError("position_ids: needed for rows that hold different numbers of cached tokens")
            pos = torch.arange(cached[0], cached[0] + S, device=input_ids.device)
            position_ids = torch.stack([pos, torch.zeros_like(pos)])[None].expand(B, 2, S)
        # GLM's context is its position table: Part A takes positions, Part B and padding reuse them
        P, context, extent = self.pre_seq_len, self.model.config.n_positions, int(position_ids[:, 0].max()) + 1
        if P + extent > context:
            raise ValueError(
                f"pre_seq_len: the prefix of {P} tokens and a text of {extent} positions overflow the context of "
                f"{context} (max_sequence_length + 1); shorten the text or the prefix"
            )
        m = attention_mask
        if isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[-1] == max(cached) + S != S:
            attention_mask = _prefix_columns(m, P)
        return self.model(
            input_ids,
            position_ids,
            attention_mask,
            cache=self._prefixed(cache, B),
            return_hidden=return_hidden,
            logits_mask=logits_mask,
        )


class PrefixTunedChatGLM6B(_PrefixTuned):
    """A ChatGLM-6B with a P-tuning v2 prefix, as THUDM/chatglm-6b computes it with ``pre_seq_len`` set.

    ``forward`` takes ``GLM.forward``'s arguments, as every wrapper does (generate/fast.py ``forward_for``), so
    ``glmkit.finetune``'s batches, ``batch_loss`` and generation run it: the mask is **True = may attend** (or a
    Part-A length ``sep``), unlike ``ChatGLM6B.forward``'s hub masks (True = masked; pass ``~mask``). Without a
    mask or positions it derives them from ``input_ids`` as the hub does. ``cached_forward`` is the model's own,
    the prefix added. Prefix plus text must fit ``max_sequence_length``, the context the model was trained for.
    """

    def __init__(self, model: ChatGLM6B, pre_seq_len: int, prefix_projection: bool = False) -> None:
        super().__init__(model, pre_seq_len, prefix_projection, "max_sequence_length")

    def cached_forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Any = None,
        hidden: bool = False,
        lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """``ChatGLM6B.cached_forward`` (glmkit's mask, over the text's keys) with the prefix in front. No query row is
        blind: every row sees the prefix, and the hub's -10000 fill of the text's columns leaves it the weight."""
        if attention_mask is not None:
            attention_mask = _prefix_columns(attention_mask, self.pre_seq_len)
        cache = self._prefixed(cache, input_ids.shape[0])
        return self.model.cached_forward(input_ids, position_ids, attention_mask, cache, hidden, lengths)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        cache: Any = None,
        return_hidden: bool = False,
        logits_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, S, V]`` (``[N, V]`` at ``logits_mask``'s positions), or the final hidden states.

        Args:
            position_ids: ``[B, 2, S]``; default the hub ``get_position_ids`` of ``input_ids`` (needed once the
                cache holds tokens).
            attention_mask: ``None`` (the hub ``get_masks`` of ``input_ids``; with cached tokens: all of them
                visible, the new ones causal), a Part-A length ``sep`` (scalar or ``[B]``), or a boolean
                ``[B, 1, S, S]`` / ``[B, 1, S, cached + S]`` mask, True = may attend, over the text's keys.
            cache: a ``KVCache`` (or rows of one); it stores the text's keys only.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a [B, S] tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
        B, S = input_ids.shape
        cfg, device = self.model.config, input_ids.device
        cached = _cached_lengths(cache, B)
        past = max(cached)
        if past == 0 and (position_ids is None or attention_mask is None):
            derived = chatglm6b_inputs(
                input_ids, sop_id=cfg.bos_token_id, mask_id=cfg.mask_token_id, gmask_id=cfg.gmask_token_id
            )
            position_ids = derived[0] if position_ids is None else position_ids
            attention_mask = derived[1] if attention_mask is None else attention_mask
        elif position_ids is None:
            raise ValueError("position_ids: needed once the cache holds tokens (ChatGLM-6B's 2D positions)")
        if attention_mask is None:  # new tokens after cached ones: every cached token visible, the new ones causal
            attention_mask = torch.ones(S, S, dtype=torch.bool, device=device).tril()[None, None]
        elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            _check_glmkit_convention(attention_mask, S)
        visible = normalize_attention_mask(attention_mask, B, S, past + S, device)
        if past > 0 and visible.shape[-1] == S:
            visible = mask_with_cache(visible, cached, B)
        visible = _prefix_columns(visible.expand(B, 1, S, visible.shape[-1]), self.pre_seq_len)
        # ChatGLM6B.forward validates ids and positions and takes the hub's convention (True = masked)
        x = self.model(input_ids, position_ids, ~visible, cache=self._prefixed(cache, B), return_hidden=True)
        if logits_mask is not None:
            x = x[logits_mask]
        return x if return_hidden else self.model.lm_head(x)


def _check_glmkit_convention(mask: torch.Tensor, S: int) -> None:
    """A token always sees itself, so a mask row in which none does is the hub's convention (True = masked); the
    hub pads every row to the longest, which has no padding and so shows it."""
    if mask.shape[-2:] != (S, S):
        return
    diagonal = mask[..., torch.arange(S), torch.arange(S)] != 0  # [B, 1, S]
    blind = (~diagonal.any(-1)).flatten().nonzero()
    if len(blind):
        raise ValueError(
            f"attention_mask: no token of row {int(blind[0])} may attend to itself; the prefixed model takes "
            "glmkit's masks (True = may attend), not the ChatGLM-6B hub's (True = masked): pass ~mask"
        )


def _freeze_all_but_prefix(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("prefix_encoder."))


def add_prefix(model: nn.Module, pre_seq_len: int, projection: bool = False) -> nn.Module:
    """A trainable P-tuning v2 prefix of ``pre_seq_len`` tokens on a frozen ``model``.

    A GLM or ChatGLM-6B comes back wrapped (``PrefixTunedGLM``, ``PrefixTunedChatGLM6B``); a ChatGLM2/3/GLM-4 model
    gets the hub's own ``prefix_encoder`` (its config's ``pre_seq_len``) and comes back itself. ``projection``: the
    hub's ``prefix_projection`` (the embedding goes through a two-layer tanh MLP). The prefix is initialised
    N(0, 1), as the hub's embedding is."""
    if isinstance(model, GLM):
        out = PrefixTunedGLM(model, pre_seq_len, projection)
    elif isinstance(model, ChatGLM6B):
        out = PrefixTunedChatGLM6B(model, pre_seq_len, projection)
    elif isinstance(model, ChatGLM2):
        _check_prefix_length(pre_seq_len, model.config.seq_length, "seq_length")
        model.config = dataclasses.replace(model.config, pre_seq_len=pre_seq_len, prefix_projection=projection)
        p = model.wte.weight
        model.prefix_encoder = PrefixEncoder(model.config).to(p.device, p.dtype if p.is_floating_point() else None)
        out = model
    else:
        raise TypeError(f"model: expected a glmkit GLM or ChatGLM model, got {type(model).__name__}")
    _freeze_all_but_prefix(out)
    return out


def save_prefix(model: nn.Module, folder: str | Path) -> None:
    """Write the prefix only, as ChatGLM's P-tuning checkpoints hold it: ``model.safetensors`` with
    ``transformer.prefix_encoder.*`` and a ``config.json`` with ``pre_seq_len`` and ``prefix_projection``."""
    encoder = getattr(model, "prefix_encoder", None)
    if not isinstance(encoder, PrefixEncoder):
        raise TypeError(f"model: {type(model).__name__} has no P-tuning prefix (add_prefix or load_prefix adds one)")
    state = {f"transformer.{PREFIX_KEY}{k}": v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    config = {"pre_seq_len": encoder.config.pre_seq_len, "prefix_projection": encoder.config.prefix_projection}
    with staged_folder(folder, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})


def load_prefix(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the P-tuning v2 prefix saved in ``folder`` (``save_prefix``, or a released ChatGLM P-tuning checkpoint:
    ``pytorch_model.bin`` holding ``transformer.prefix_encoder.*`` only) on ``model``; returns the prefixed model
    as ``add_prefix`` does, frozen but for the prefix. Shapes are checked against the model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"prefix folder {folder} does not exist")
    state = {k.split(PREFIX_KEY, 1)[1]: v for k, v in load_state_dict(folder).items() if PREFIX_KEY in k}
    if "embedding.weight" not in state:
        raise CheckpointError(f"{folder}: no prefix_encoder.embedding.weight (not a P-tuning v2 checkpoint)")
    pre_seq_len, projection = state["embedding.weight"].shape[0], any(k.startswith("trans.") for k in state)
    if (folder / "config.json").is_file():
        declared = json.loads((folder / "config.json").read_text()).get("pre_seq_len")
        if declared not in (None, pre_seq_len):
            raise CheckpointError(f"{folder}: config.json says pre_seq_len={declared}, the weights hold {pre_seq_len}")
    base = model.model if isinstance(model, _PrefixTuned) else model
    out = add_prefix(base, pre_seq_len, projection)
    encoder = out.prefix_encoder
    expected = encoder.state_dict()
    for k, v in state.items():
        if k not in expected or v.shape != expected[k].shape:
            want = tuple(expected[k].shape) if k in expected else "no such tensor"
            raise CheckpointError(
                f"{folder}: prefix_encoder.{k} {tuple(v.shape)} does not fit this model (expected {want}: the "
                "prefix holds n_layer · 2 · KV heads · head_size values per token)"
            )
    encoder.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return out
