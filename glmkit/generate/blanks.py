"""Fill every blank of a GLM input, one span after another, as the original ``generate_samples.py`` does.

THUDM/GLM ``generate_samples.py`` (docs/glm-notes.md, TV7): the context (with all its [MASK]/[sMASK]/[gMASK] blanks)
is encoded once, bidirectionally; then for each blank at position p, left to right, ``<sop>`` is fed at (p, 1) and
the k-th token at (p, k+1). A span ends at ``<eop>`` (or ``<eos>``), which is not fed back. Earlier spans stay in
the cache, so later spans see them. Each span is decoded with the full ``generate`` machinery (greedy, sampling or
beams). Unlike the hub's ``generate`` (first blank only) this fills all blanks, which is what GLM was trained to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import SpecialTokens
from ..kv_cache import KVCache
from ..masks import find_blanks, mask_with_cache, prefix_lm_mask, span_feed
from ..prompts import continuation_ids, infilling_ids, layout, model_family
from ..tokenizer import TokenizerLike
from .config import GenerationConfig
from .engine import (
    Decoding,
    GLMStepper,
    Streamer,
    generate,
    prefill,
    prepare_model,
    resolve_special_tokens,
    seeded_generator,
)
from .fast import cache_dtype, forward_for
from .stopping import FinishReason


@dataclass
class BlankFill:
    """``ids``: the input with each blank replaced by its span; ``spans``: the generated tokens per blank, left to
    right, without the stop token; ``blank_positions``: where the blanks were in the input."""

    ids: list[int]
    spans: list[list[int]]
    finish_reasons: list[FinishReason]
    blank_positions: list[int]


@dataclass
class FillResult:
    text: str
    spans: list[str]


@torch.inference_mode()
def fill_blank_ids(
    model: torch.nn.Module,
    input_ids: Sequence[int],
    *,
    generation_config: GenerationConfig | None = None,
    special_tokens: SpecialTokens | None = None,
    tokenizer: TokenizerLike | None = None,
    generator: torch.Generator | None = None,
    streamer: Streamer | None = None,
    **kwargs: Any,
) -> BlankFill:
    """Fill every blank of one token sequence (usually ``[CLS] text [eos]``); ``kwargs`` as for ``generate``.

    ``max_new_tokens`` and the other settings apply to each span; ``num_return_sequences`` must be 1. A
    transformers-style ``streamer`` sees each span as one generation: ``put(prompt)``, ``put(token)``..., ``end()``.
    """
    config = GenerationConfig.from_kwargs(generation_config, **kwargs)
    if config.num_return_sequences != 1:
        raise ValueError(
            f"num_return_sequences: blank filling returns one completion; got {config.num_return_sequences}"
        )
    if streamer is not None and config.num_beams > 1:
        raise ValueError("streamer: streaming is not supported with beam search (num_beams > 1)")
    if getattr(model, "causal_lm", False):
        raise ValueError("fill_blank_ids: ChatGLM2/3 and GLM-4 are causal LMs: they continue a prompt, fill no blanks")
    special = resolve_special_tokens(model, special_tokens, tokenizer)
    prompts = layout(special, model_family(model))
    row = list(input_ids)
    blanks = find_blanks(row, prompts.blank_ids())
    if not blanks:
        raise ValueError(f"input_ids: no blank to fill (none of the blank ids {list(prompts.blank_ids())})")
    cfg = model.config
    if len(row) > cfg.n_positions:
        raise ValueError(f"input_ids: {len(row)} tokens is longer than the context of {cfg.n_positions} positions")
    prepare_model(model, config)
    device = next(model.parameters()).device
    max_new = min(config.max_new_tokens, cfg.max_sequence_length)
    R = config.num_beams
    cache = KVCache.for_model(model, 1, len(row) + len(blanks) * (max_new + 1), dtype=cache_dtype(model))
    prefill(model, [row], cache)
    generator = seeded_generator(config, device, generator)  # one RNG stream across all spans
    eos_ids = config.eos_ids() or prompts.stop_ids()
    pad_id = config.pad_token_id if config.pad_token_id is not None else special.pad

    history = list(row)  # every token in the cache: what the processors see, as transformers would
    spans: list[list[int]] = []
    reasons: list[FinishReason] = []
    for i, p in enumerate(blanks):
        base = cache.host_lengths()[0]
        if R > 1:
            cache.reorder(torch.zeros(R, dtype=torch.long, device=device))
        stepper = GLMStepper(model, cache, torch.full((R,), p, device=device), special.sop, config.compile)
        ids = torch.tensor([history + [special.sop]] * R, device=device)
        decoding = Decoding(
            stepper,
            ids,
            torch.zeros(R, dtype=torch.long, device=device),
            config,
            eos_ids=eos_ids,
            pad_id=pad_id,
            position_limit=cfg.max_sequence_length,
            tokenizer=tokenizer,
            generator=generator,
        )
        if streamer is not None:
            streamer.put(ids.cpu())
        out = decoding.run(streamer)
        if streamer is not None:
            streamer.end()
        span, reason = out.new_tokens[0], out.finish_reasons[0]
        span = span[:-1] if reason == "stop" else span  # the stop token is not part of the span
        spans.append(span)
        reasons.append(reason)
        history += [special.sop] + span
        if i + 1 < len(blanks):
            # keep exactly `<sop> span` of the chosen sequence in the cache (beams reordered it; decoding may have
            # run past the span), as the context of the next blanks
            if cache.batch_size > 1:
                cache.reorder(torch.zeros(1, dtype=torch.long, device=device))
            cache.set_lengths([base])
            feed = span_feed(p, span, special.sop, cfg.max_sequence_length)
            rows = torch.tensor(feed, device=device).T.contiguous()  # token, position, block
            mask = mask_with_cache(prefix_lm_mask(0, len(feed), device=device), [base], 1)  # causal span
            forward_for(model)(rows[:1], rows[None, 1:], mask, cache, True)
    filled = dict(zip(blanks, spans, strict=True))
    completed = [t for i, tok in enumerate(row) for t in (filled[i] if i in filled else [tok])]
    return BlankFill(completed, spans, reasons, blanks)


def fill_blanks(model: torch.nn.Module, tokenizer: TokenizerLike, text: str, **kwargs: Any) -> FillResult:
    """Fill every [MASK]/[sMASK]/[gMASK] in ``text``; the input is ``[CLS] text [eos]`` (no eos after a final
    blank), as in the original GLM (``prompts.infilling_ids``). Returns the completed text and each span's text."""
    ids = infilling_ids(tokenizer, text, model_family(model))
    res = fill_blank_ids(model, ids, special_tokens=tokenizer.special, tokenizer=tokenizer, **kwargs)
    spans = [tokenizer.decode(s, skip_special_tokens=True) for s in res.spans]
    return FillResult(tokenizer.decode(res.ids, skip_special_tokens=True), spans)


def complete(model: torch.nn.Module, tokenizer: TokenizerLike, text: str, **kwargs: Any) -> str:
    """Continue ``text``: ``[CLS] text [gMASK]`` (``prompts.continuation_ids``), generate the span at the [gMASK]
    and return its text.

    Blanks inside ``text`` are filled first (the original GLM's behaviour) and serve as context.
    """
    ids = continuation_ids(tokenizer, text, model_family(model))
    if getattr(model, "causal_lm", False):  # ChatGLM2/3, GLM-4: `[gMASK] sop text` continued causally
        out = generate(model, [ids], tokenizer=tokenizer, **kwargs)
        span = out.new_tokens[0][:-1] if out.finish_reasons[0] == "stop" else out.new_tokens[0]
        return tokenizer.decode(span, skip_special_tokens=True)
    res = fill_blank_ids(model, ids, special_tokens=tokenizer.special, tokenizer=tokenizer, **kwargs)
    return tokenizer.decode(res.spans[-1], skip_special_tokens=True)
