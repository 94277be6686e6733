"""Generation for causal LMs (ChatGLM2/3, GLM-4: a model class with ``causal_lm = True``).

There is no Part A / Part B: the prompt is prefilled causally and continued one token per step, each new token at the
next position of its row. Prompts are laid out by ``glmkit.prompts`` (``[gMASK] sop text`` for this family).

Batching as in engine.py: prompts are right-padded for one prefill (padding keys are masked out), the first new
token's logits are read at each row's last real token, and ``cache.set_lengths`` drops the padding, so every row
continues at its own length and computes exactly what it would alone. Towards the decoding loops each row is the
left-padded prompt transformers would hold. The cache holds the model's KV heads only (``KVCache.for_model``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..kv_cache import KVCache, KVCacheRows
from ..prompts import layout
from .config import GenerationConfig
from .engine import Decoding, TokenIds, unpadded_rows
from .fast import DecodeStep, cache_dtype


class CausalStepper:
    """``step(None)`` returns the prefill's next-token logits; ``step(tokens)`` feeds one token per row at the row's
    next position and returns the logits after it."""

    def __init__(
        self, model: torch.nn.Module, cache: KVCache, first: torch.Tensor, lengths: torch.Tensor, compile=False
    ) -> None:
        self.cache, self.first, self.positions = cache, first, lengths
        self.decode = DecodeStep(model, compile)

    def step(self, tokens: torch.Tensor | None) -> torch.Tensor:
        if tokens is None:
            return self.first
        logits = self.decode(tokens[:, None], self.positions[:, None], self.cache)
        self.positions = self.positions + 1
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.positions = self.positions[index]


def encode(model: torch.nn.Module, rows: list[list[int]], cache: KVCache | KVCacheRows | None) -> torch.Tensor:
    """Encode every prompt into ``cache`` (causal, right-padded, padding keys masked; each row then holds its own
    length) and return the final hidden states ``[B, S, C]``. The serving engine prefills its slots with it and
    scores rows without a cache (``None``)."""
    device = cache.device if cache is not None else next(model.parameters()).device
    lengths = torch.tensor([len(r) for r in rows], device=device)
    S = int(lengths.max())
    ids = torch.tensor([r + [r[-1]] * (S - len(r)) for r in rows], device=device)
    arange = torch.arange(S, device=device)
    positions = torch.minimum(arange[None], lengths[:, None] - 1)
    causal = arange[None, :] <= arange[:, None]
    mask = (causal[None] & (arange < lengths[:, None])[:, None, :])[:, None]  # [B, 1, S, S]
    hidden = model(ids, positions, mask, cache=cache, return_hidden=True)
    if cache is not None:
        cache.set_lengths(lengths.tolist())
    return hidden


def prefill(model: torch.nn.Module, rows: list[list[int]], cache: KVCache) -> torch.Tensor:
    """Encode every prompt into ``cache`` (``encode``) and return its next-token logits ``[B, V]``."""
    hidden = encode(model, rows, cache)
    last = torch.tensor([len(r) - 1 for r in rows], device=hidden.device)
    return model.lm_head(hidden[torch.arange(len(rows), device=hidden.device), last])


def start(
    model: torch.nn.Module,
    input_ids: TokenIds,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    special_tokens: Any,
    tokenizer: Any,
    generator: torch.Generator | None,
) -> tuple[Decoding, list[list[int]]]:
    """Validate, prefill and build the ``Decoding`` for one ``generate``/``stream`` call of a causal model. With
    special ids (``special_tokens``, else the tokenizer's), a prompt without the ``[gMASK] sop`` prefix gets it
    (``glmkit.prompts``, family ``chatglm2``); without, the ids are the model input as they are."""
    cfg = model.config
    rows = unpadded_rows(input_ids, attention_mask)
    # a ChatGLM tokenizer's own ids (``specials``) list its chat stop ids, which ``SpecialTokens`` has no field for
    special = special_tokens or getattr(tokenizer, "specials", None) or getattr(tokenizer, "special", None)
    prompts = layout(special, "chatglm2") if special is not None else None
    if prompts is not None:
        rows = [prompts.model_input(r) for r in rows]
    for b, row in enumerate(rows):
        if len(row) > cfg.seq_length:
            raise ValueError(f"input_ids: prompt {b} has {len(row)} tokens, more than seq_length={cfg.seq_length}")
    device = next(model.parameters()).device
    repeat = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    P = max(len(r) for r in rows)
    # the last generated token is never fed: the context holds the prompt and max_new - 1 new tokens
    max_new = min(config.max_new_tokens, cfg.seq_length - P + 1)
    cache = KVCache.for_model(model, len(rows), P + max_new, dtype=cache_dtype(model, config.compile))
    first = prefill(model, rows, cache)
    expand = torch.arange(len(rows), device=device).repeat_interleave(repeat)
    if repeat > 1:
        cache.reorder(expand)
    lengths = torch.tensor([len(r) for r in rows], device=device)[expand]
    stepper = CausalStepper(model, cache, first[expand], lengths, config.compile)
    pad_id = config.pad_token_id if config.pad_token_id is not None else cfg.pad_token_id
    ids = torch.tensor([[pad_id] * (P - len(r)) + r for r in rows], device=device)[expand]
    decoding = Decoding(
        stepper,
        ids,
        P - lengths,
        config,
        eos_ids=config.eos_ids() or list(dict.fromkeys([*cfg.eos_ids, *(prompts.stop_ids() if prompts else [])])),
        pad_id=pad_id,
        position_limit=max_new,
        tokenizer=tokenizer,
        generator=generator,
    )
    return decoding, rows
