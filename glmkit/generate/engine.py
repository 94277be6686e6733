"""GLM generation: prefill Part A once, then decode the Part-B span one token per step over a ``KVCache``.

Plain continuation is blank filling of a trailing [gMASK] (appended when the prompt has no blank): the prompt is
Part A (bidirectional, ``sep`` = its length), ``<sop>`` is fed at (blank position, block 1) and the k-th generated
token at (blank position, block k+1); decode steps see the whole cache. With several blanks ``generate`` fills the
first, like the hub's ``build_inputs_for_generation``; blanks.py fills them all.

Batching: prompts are right-padded for one prefill (padding is masked out), then ``cache.set_lengths`` drops the
padding so each row continues at its own length and new tokens overwrite the pad slots. Rows therefore compute
exactly what they would alone. Towards the decoding loops (sampling.py, beam.py) each row is the sequence
transformers would hold for the same request: left-padded Part A, ``<sop>``, then the generated tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..config import SpecialTokens
from ..kv_cache import KVCache, KVCacheRows
from ..masks import find_blanks, part_a_positions, part_b_step_positions, prefix_lm_mask
from ..prompts import DEFAULT_FAMILY, layout, model_family
from .beam import beam_search
from .config import GenerationConfig
from .fast import DecodeStep, cache_dtype, forward_for, optimize_for_decode
from .processors import build_processors
from .sampling import SampleRun, Stepper
from .stopping import Decoder, FinishReason, StopCriteria, StopStrings

TokenIds = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


class Streamer(Protocol):
    """transformers' streamer protocol: ``put(prompt ids)``, then ``put(new token)`` every step, then ``end()``."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass
class GenerationOutput:
    """What ``generate`` returns.

    ``sequences [R, P + T]`` is exactly transformers' output for the same request: ``P`` = the left-padded prompt
    (Part A + ``<sop>``), then the generated tokens; finished rows are filled with the pad id (beams: pad, or the
    first stop id when pad is 0, as transformers). ``R`` = prompts × ``num_return_sequences``, grouped by prompt.
    ``new_tokens[r]`` are row r's generated tokens, its stop token included; ``scores`` are beam scores.
    """

    sequences: torch.Tensor
    prompt_length: int
    new_tokens: list[list[int]]
    finish_reasons: list[FinishReason]
    scores: torch.Tensor | None = None


class GLMStepper:
    """Feeds one Part-B token per row at ``(blank position, block)`` and returns the next-token logits ``[N, V]``."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: KVCache,
        blank_positions: torch.Tensor,
        sop_id: int,
        compile: bool | str = False,
    ) -> None:
        self.model, self.cache, self.blank_positions, self.sop_id = model, cache, blank_positions, sop_id
        self.block = 0
        self.decode = DecodeStep(model, compile)

    def step(self, tokens: torch.Tensor | None) -> torch.Tensor:
        if tokens is None:
            tokens = torch.full_like(self.blank_positions, self.sop_id)
        self.block += 1
        positions = part_b_step_positions(self.blank_positions, self.block)
        return self.decode(tokens[:, None], positions, self.cache)

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.blank_positions = self.blank_positions[index]


def seeded_generator(
    config: GenerationConfig, device: torch.device, generator: torch.Generator | None = None
) -> torch.Generator | None:
    """``generator`` if given, else one seeded with ``config.seed``, else ``None`` (the global RNG)."""
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    return generator


def resolve_special_tokens(
    model: torch.nn.Module, special_tokens: SpecialTokens | None, tokenizer: Any = None
) -> SpecialTokens:
    """The explicit ids, else the model config's, else the tokenizer's ``special``."""
    special = special_tokens or getattr(model.config, "special_tokens", None) or getattr(tokenizer, "special", None)
    if special is None:
        raise ValueError(
            "special_tokens: the model config names no special tokens; pass special_tokens= or a tokenizer"
        )
    return special


def decodable_size(tokenizer: Any) -> int | None:
    """How many ids ``tokenizer`` can decode (``None``: unknown): a transformers tokenizer's ``len()`` (added tokens
    included; its ``vocab_size`` leaves them out), else ``vocab_size`` (glmkit tokenizers count their specials)."""
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    return getattr(tokenizer, "vocab_size", None)


def unpadded_rows(input_ids: TokenIds, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """The prompts as lists of ids: one list, ragged lists, or the unpadded rows of a ``[B, S]`` tensor."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, S] token ids, got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {tuple(ids.shape)}")
        keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        rows = [r[k].tolist() for r, k in zip(ids.cpu(), keep.cpu(), strict=True)]
    else:
        first = input_ids[0] if len(input_ids) else []
        nested = isinstance(first, Sequence) or (isinstance(first, torch.Tensor) and first.dim() > 0)
        rows = [[int(t) for t in r] for r in input_ids] if nested else [[int(t) for t in input_ids]]
    if not rows:
        raise ValueError("input_ids: no prompt given")
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"input_ids: prompt {b} is empty")
    return rows


def prompt_rows(
    input_ids: TokenIds,
    attention_mask: torch.Tensor | None,
    special: SpecialTokens,
    max_length: int,
    family: str = DEFAULT_FAMILY,
) -> list[list[int]]:
    """Unpadded Part-A rows, each completed by ``prompts.layout(special, family).model_input`` (GLM: a row without a
    blank gets [gMASK], or [MASK] in a vocabulary without task masks, as the original GLM does; ChatGLM-6B: the
    tokenizer's trailing ``<sop>`` is dropped, since the engine feeds it)."""
    rows = unpadded_rows(input_ids, attention_mask)
    prompts = layout(special, family)
    for b, row in enumerate(rows):
        row[:] = prompts.model_input(row)
        if len(row) > max_length:
            raise ValueError(
                f"input_ids: prompt {b} has {len(row)} tokens (blank included), longer than the context of "
                f"{max_length} positions (max_sequence_length + 1)"
            )
    return rows


def prefill(model: torch.nn.Module, rows: list[list[int]], cache: KVCache | KVCacheRows) -> None:
    """Encode Part A of every row into ``cache`` (bidirectional, padding masked) and drop the padding."""
    device = cache.device
    lengths = [len(r) for r in rows]
    S = max(lengths)
    ids = torch.tensor([r + [r[-1]] * (S - len(r)) for r in rows], device=device)
    mask = prefix_lm_mask(lengths, S, valid_lengths=lengths, device=device)
    forward_for(model)(ids, part_a_positions(lengths, S, device=device), mask, cache, True, lengths)
    cache.set_lengths(lengths)


class Decoding:
    """One span decode over a ``Stepper`` (a ``GLMStepper``, or a table model in the tests).

    Builds the processors and stop rules and runs greedy/sampling or beam search.

    ``ids [N, P]`` is what transformers would hold per row (left-padded prompt + ``<sop>``), ``left_padding [N]``
    its pad counts; rows are already expanded to ``num_beams`` (beams) or ``num_return_sequences`` (sampling).
    """

    def __init__(
        self,
        stepper: Stepper,
        ids: torch.Tensor,
        left_padding: torch.Tensor,
        config: GenerationConfig,
        *,
        eos_ids: list[int],
        pad_id: int,
        position_limit: int,
        tokenizer: Decoder | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if config.stop_strings and tokenizer is None:
            raise ValueError("stop_strings: a tokenizer is needed to match stop strings; pass tokenizer=")
        self.stepper, self.ids, self.config = stepper, ids, config
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.generator = seeded_generator(config, ids.device, generator)
        stops = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
        max_new = min(config.max_new_tokens, position_limit)
        self.stop = StopCriteria(ids.shape[1], max_new, eos_ids, stops, max_new < config.max_new_tokens)
        self.processors = build_processors(config, eos_ids, ids.shape[1], left_padding, decodable_size(tokenizer))

    def steps(self) -> SampleRun:
        """Greedy/sampling as an iterator of per-step tokens; the run keeps ``ids``, ``reasons``, ``lengths``."""
        return SampleRun(
            self.stepper,
            self.ids,
            self.stop,
            self.processors,
            do_sample=self.config.do_sample,
            pad_id=self.pad_id,
            generator=self.generator,
        )

    def run(self, streamer: Streamer | None = None) -> GenerationOutput:
        P = self.ids.shape[1]
        if self.config.num_beams > 1:
            c = self.config
            # transformers fills short beams with `pad or eos[0]` (a pad id of 0 gives the stop id)
            fill = self.pad_id or (self.eos_ids[0] if self.eos_ids else -1)
            res = beam_search(
                self.stepper,
                self.ids,
                self.stop,
                self.processors,
                num_beams=c.num_beams,
                n_eos=len(self.eos_ids),
                length_penalty=c.length_penalty,
                early_stopping=c.early_stopping,
                num_return_sequences=c.num_return_sequences,
                fill_id=fill,
                do_sample=c.do_sample,
                generator=self.generator,
            )
            new = [res.sequences[r, P : P + n].tolist() for r, n in enumerate(res.lengths)]
            reasons = [self.stop.reasons(res.sequences[r : r + 1, : P + n])[0] for r, n in enumerate(res.lengths)]
            return GenerationOutput(res.sequences, P, new, [r or "length" for r in reasons], res.scores)
        run = self.steps()
        for tokens in run:
            if streamer is not None:
                streamer.put(tokens.cpu())
        new = [run.ids[r, P : P + n].tolist() for r, n in enumerate(run.lengths)]
        return GenerationOutput(run.ids, P, new, [r or "length" for r in run.reasons])


def prepare_model(model: torch.nn.Module, config: GenerationConfig) -> None:
    """Eval mode and, unless ``config.kernels`` is False, glmkit's kernels (``optimize_for_decode``, in place), so a
    library call decodes as fast as the CLI."""
    if config.kernels:
        optimize_for_decode(model)
    else:
        model.eval()


def _start(
    model: torch.nn.Module,
    input_ids: TokenIds,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    special_tokens: SpecialTokens | None,
    tokenizer: Decoder | None,
    generator: torch.Generator | None,
) -> tuple[Decoding, list[list[int]]]:
    """Validate, prefill and build the ``Decoding`` for one ``generate``/``stream`` call."""
    if getattr(model, "causal_lm", False):  # ChatGLM2/3, GLM-4: the prompt is continued as given (causal.py)
        from .causal import start

        return start(model, input_ids, attention_mask, config, special_tokens, tokenizer, generator)
    special = resolve_special_tokens(model, special_tokens, tokenizer)
    cfg, family = model.config, model_family(model)
    rows = prompt_rows(input_ids, attention_mask, special, cfg.n_positions, family)
    device = next(model.parameters()).device
    repeat = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    max_new = min(config.max_new_tokens, cfg.max_sequence_length)  # blocks 1..max_new are fed
    P = max(len(r) for r in rows)
    cache = KVCache.for_model(model, len(rows), P + max_new, dtype=cache_dtype(model, config.compile))
    prefill(model, rows, cache)
    expand = torch.arange(len(rows), device=device).repeat_interleave(repeat)
    if repeat > 1:
        cache.reorder(expand)
    blank_ids = layout(special, family).blank_ids()
    blanks = torch.tensor([find_blanks(r, blank_ids)[0] for r in rows], device=device)[expand]
    stepper = GLMStepper(model, cache, blanks, special.sop, config.compile)
    ids = torch.tensor([[special.pad] * (P - len(r)) + r + [special.sop] for r in rows], device=device)[expand]
    left_padding = torch.tensor([P - len(r) for r in rows], device=device)[expand]
    eos_ids = config.eos_ids() or layout(special, family).stop_ids()
    pad_id = config.pad_token_id if config.pad_token_id is not None else special.pad
    decoding = Decoding(
        stepper,
        ids,
        left_padding,
        config,
        eos_ids=eos_ids,
        pad_id=pad_id,
        position_limit=cfg.max_sequence_length,
        tokenizer=tokenizer,
        generator=generator,
    )
    return decoding, rows


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: TokenIds,
    *,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    special_tokens: SpecialTokens | None = None,
    tokenizer: Decoder | None = None,
    generator: torch.Generator | None = None,
    streamer: Streamer | None = None,
    **kwargs: Any,
) -> GenerationOutput:
    """Generate a Part-B span for each prompt with transformers' ``generate`` semantics.

    Args:
        model: a glmkit ``GLM`` (any dtype, any device; it is put in eval mode).
        input_ids: one prompt (a list of ids), several (ragged lists) or a ``[B, S]`` tensor; each is Part A
            (usually ``[CLS] text [gMASK]``). A prompt without a blank gets [gMASK] appended.
        attention_mask: for a tensor ``input_ids``, transformers' ``[B, S]`` 0/1 padding mask (left or right pad).
        generation_config: base settings; ``kwargs`` (transformers' names: ``max_new_tokens``, ``do_sample``,
            ``num_beams``, ``top_p``, ``eos_token_id``, ``stop_strings``, ``seed`` ...) override its fields.
        special_tokens: GLM special ids; default the model config's, else ``tokenizer.special``.
        tokenizer: needed for ``stop_strings``; when given, ids it cannot decode (from its size on, e.g. the
            padding rows of a model's vocabulary) are never generated.
        generator: RNG for sampling (default: ``seed``'s generator, else the global RNG, like transformers).
        streamer: transformers-style streamer (batch size 1, no beams).
    """
    config = GenerationConfig.from_kwargs(generation_config, **kwargs)
    prepare_model(model, config)
    decoding, rows = _start(model, input_ids, attention_mask, config, special_tokens, tokenizer, generator)
    if streamer is not None:
        if config.num_beams > 1:
            raise ValueError("streamer: streaming is not supported with beam search (num_beams > 1)")
        if decoding.ids.shape[0] != 1:
            raise ValueError("streamer: streaming needs a single prompt and num_return_sequences=1")
        streamer.put(decoding.ids.cpu())
    out = decoding.run(streamer)
    if streamer is not None:
        streamer.end()
    return out


def stream(
    model: torch.nn.Module,
    input_ids: TokenIds,
    *,
    generation_config: GenerationConfig | None = None,
    special_tokens: SpecialTokens | None = None,
    tokenizer: Decoder | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> Iterator[int]:
    """Yield the generated token ids of one prompt as they are produced (greedy or sampling; stop id included)."""
    config = GenerationConfig.from_kwargs(generation_config, **kwargs)
    if config.num_beams > 1 or config.num_return_sequences > 1:
        raise ValueError("num_beams: stream() yields one sequence; use generate() for beams or several samples")
    prepare_model(model, config)
    with torch.inference_mode():
        decoding, rows = _start(model, input_ids, None, config, special_tokens, tokenizer, generator)
    if len(rows) != 1:
        raise ValueError(f"input_ids: stream() takes one prompt, got {len(rows)}")
    steps = iter(decoding.steps())
    while True:
        with torch.inference_mode():  # per step: the caller's code between tokens must not run in inference mode
            tokens = next(steps, None)
        if tokens is None:
            return
        yield int(tokens[0])
