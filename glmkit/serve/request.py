"""A serving request: what was asked, and the decoding state of its one sequence between engine steps.

The engine batches requests at every decode step, so a request cannot own a decoding loop the way
``glmkit.generate`` does; instead it keeps that loop's state and the engine advances it one token at a time. The
state is built from the same pieces — ``build_processors``, ``StopCriteria``, ``StopStrings``, the 2D positions of
``masks.py`` and a seeded generator — so a request produces exactly the tokens it would produce alone:
``fill="first"`` is ``generate`` (the span of the first blank; a prompt without a blank gets [gMASK]) and
``fill="all"`` is ``fill_blank_ids`` (every blank left to right, each span seeing the earlier ones). The prompt
layout is the model family's (``glmkit.prompts``): ChatGLM-6B's is GLM's without [CLS], and a causal family
(ChatGLM2/3, GLM-4: no blanks) continues its ``[gMASK] sop text`` prompt as ``glmkit.generate.causal`` does: the
prefill of the whole prompt chooses the first token, and each token is then fed at its row's next 1-D position.

One request is one sequence: an API call with ``n > 1`` becomes ``n`` requests, and beam search runs as a
one-shot ``generate`` job (see engine.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import SpecialTokens
from ..generate.config import GenerationConfig
from ..generate.engine import seeded_generator
from ..generate.processors import build_processors
from ..generate.stopping import Decoder, StopCriteria, StopStrings
from ..masks import find_blanks, span_feed
from ..prompts import DEFAULT_FAMILY, layout

Fill = Literal["first", "all"]
FinishReason = Literal["stop", "stop_string", "length", "position_limit", "abort"]


@dataclass
class TokenLogprob:
    """Log-probability of a generated token under the model (before any processor), and the ``top`` alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What a request produced since its previous output.

    ``token_ids`` are new tokens of span ``span_index`` (a span's stop token included, as in ``generate``). The
    last output has ``finished`` set, the ``finish_reason`` of the last span, and ``spans``: every filled span
    without its stop token (``fill_blank_ids``'s ``spans``).
    """

    request_id: str
    token_ids: list[int]
    span_index: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    spans: list[list[int]] = field(default_factory=list)
    num_prompt_tokens: int = 0
    error: str | None = None


class Request:
    """One sequence to decode.

    Args:
        request_id: unique id (the engine's key).
        prompt_ids: Part A token ids, blanks included.
        config: transformers-style settings; ``num_beams`` and ``num_return_sequences`` must be 1.
        special: the GLM special token ids (a causal family: its layout's ids, e.g. a ChatGLM tokenizer's ``specials``).
        max_sequence_length: the model's position limit (largest block position; a causal model: its context).
        tokenizer: needed for ``config.stop_strings``.
        fill: ``"first"`` (``generate``) or ``"all"`` (``fill_blank_ids``).
        ignore_eos: never stop on a stop id (vLLM's ``ignore_eos``; benchmarks use it for fixed lengths).
        logprobs: report the chosen token's log-probability and this many top alternatives (``None`` = off).
        priority: lower runs first (FCFS within a level).
        device: where the request's token ids and generator live (the model's device).
        family: the model's prompt family (``glmkit.prompts.model_family``).
        stop_ids: the model's default stop ids (``glmkit.prompts.model_stop_ids``); default the layout's.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        config: GenerationConfig,
        *,
        special: SpecialTokens,
        max_sequence_length: int,
        tokenizer: Decoder | None = None,
        fill: Fill = "first",
        ignore_eos: bool = False,
        logprobs: int | None = None,
        priority: int = 0,
        device: torch.device | str = "cpu",
        family: str = DEFAULT_FAMILY,
        stop_ids: list[int] | None = None,
    ) -> None:
        if config.num_beams != 1 or config.num_return_sequences != 1:
            raise ValueError("num_beams/num_return_sequences: a request decodes one sequence; beams run as a job")
        if config.stop_strings and tokenizer is None:
            raise ValueError("stop_strings: a tokenizer is needed to match stop strings")
        if logprobs is not None and (isinstance(logprobs, bool) or not 0 <= logprobs <= 20):
            raise ValueError(f"logprobs: expected an int in [0, 20], got {logprobs!r}")
        row = [int(t) for t in prompt_ids]
        if not row:
            raise ValueError("prompt: no tokens")
        prompts = layout(special, family)
        self.causal = not prompts.blank_ids()  # ChatGLM2/3, GLM-4: the prompt is continued, no blank is filled
        if fill == "first" or self.causal:
            row = prompts.model_input(row)
        blanks = find_blanks(row, prompts.blank_ids())
        if not blanks and not self.causal:
            raise ValueError(f"prompt: no blank to fill (none of the blank ids {list(prompts.blank_ids())})")
        if fill == "first":
            blanks = blanks[:1]
        self.request_id, self.prompt_ids, self.config, self.special = request_id, row, config, special
        self.fill, self.logprobs, self.priority = fill, logprobs, priority
        self.blanks = blanks
        self.max_sequence_length = max_sequence_length
        # a causal model's positions end at its context; the last generated token is never fed
        room = max_sequence_length - len(row) + 1 if self.causal else max_sequence_length
        self.max_new = max(1, min(config.max_new_tokens, room))
        self.eos_ids = [] if ignore_eos else (config.eos_ids() or stop_ids or prompts.stop_ids())
        self.stop_strings = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
        self.device = torch.device(device)
        self.generator = seeded_generator(config, self.device)  # one RNG stream across all spans
        self.slot: int | None = None
        self.status: Literal["waiting", "running", "finished"] = "waiting"
        self.finish_reason: FinishReason | None = None
        self.spans: list[list[int]] = []
        self.arrival_time = time.monotonic()
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.num_generated = 0
        self._history = list(row)  # every token the cache holds, as fill_blank_ids keeps it
        self._span = -1
        self._feed: list[tuple[int, int, int]] = []  # (token, position, block) still to be fed to the model
        self._start_span()

    # ---- sizes ----------------------------------------------------------------------------------------------

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_spans(self) -> int:
        """Spans the request generates: one per blank, or the one continuation of a causal prompt."""
        return max(len(self.blanks), 1)

    def kv_tokens(self) -> int:
        """Cache rows this request can fill: Part A plus, per blank, ``<sop>`` and up to ``max_new`` tokens (a
        causal prompt: up to ``max_new`` tokens after it)."""
        if self.causal:
            return len(self.prompt_ids) + self.max_new
        return len(self.prompt_ids) + len(self.blanks) * (self.max_new + (len(self.blanks) > 1))

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    # ---- decoding state ------------------------------------------------------------------------------------

    def _start_span(self) -> None:
        self._span += 1
        # what transformers would hold for this span: the context (earlier spans included) and <sop>, or the
        # causal prompt as it is
        context = self._history if self.causal else self._history + [self.special.sop]
        self.ids = torch.tensor([context], device=self.device)
        P = self.ids.shape[1]
        self.generated: list[int] = []
        limited = self.max_new < self.config.max_new_tokens
        self.stop = StopCriteria(P, self.max_new, self.eos_ids, self.stop_strings, limited)
        self.processors = build_processors(self.config, self.eos_ids, P, torch.zeros(1, dtype=torch.long))
        if self.causal:  # stands for the prefill, whose last logits choose the first token (the runner feeds nothing)
            self._feed.append((context[-1], P - 1, 0))
        else:
            self._feed.append((self.special.sop, self.blanks[self._span], 1))

    def next_input(self) -> tuple[int, int, int]:
        """The token to feed this step and its 2D position: ``(token, position, block)`` (causal: block 0)."""
        return self._feed[0]

    def samples_this_step(self) -> bool:
        """Whether the logits of this step's input choose the next token (not a catch-up input between spans)."""
        return len(self._feed) == 1

    def input_done(self) -> None:
        self._feed.pop(0)

    def append_token(self, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        """Record the sampled ``token`` (as ``SampleRun``/``fill_blank_ids`` would) and return the output."""
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.num_generated += 1
        span_index = self._span
        self.ids = torch.cat([self.ids, torch.tensor([[token]], device=self.device)], dim=-1)
        self.generated.append(token)
        out = RequestOutput(self.request_id, [token], span_index, [logprob] if logprob else [])
        out.num_prompt_tokens = len(self.prompt_ids)
        reason = self.stop.reasons(self.ids)[0]
        if reason is None:
            if self.causal:
                self._feed.append((token, len(self.prompt_ids) + len(self.generated) - 1, 0))
            else:
                self._feed.append((token, self.blanks[self._span], len(self.generated) + 1))
            return out
        span = self.generated[:-1] if reason == "stop" else list(self.generated)
        self.spans.append(span)
        self._history += span if self.causal else [self.special.sop] + span
        if self._span + 1 < len(self.blanks):
            # the cache must hold span_feed's `<sop> span` before the next blank; decoding fed <sop> and every
            # generated token but the last, so a span that did not end on a stop id still lacks its last token
            done = span_feed(self.blanks[self._span], span, self.special.sop, self.max_sequence_length)
            self._feed += done[len(self.generated) :]
            self._start_span()
            return out
        self.finish(reason)
        out.finished, out.finish_reason, out.spans = True, reason, self.spans
        return out

    def finish(self, reason: FinishReason) -> None:
        # the feed is left as it is: an abort may land while a step is reading this request's next input, and the
        # scheduler skips finished requests when the step's results come back
        self.status, self.finish_reason = "finished", reason

    def final_output(self) -> RequestOutput:
        """The closing output of a request finished from outside (abort)."""
        out = RequestOutput(self.request_id, [], max(self._span, 0), finished=True, finish_reason=self.finish_reason)
        out.spans, out.num_prompt_tokens = self.spans, len(self.prompt_ids)
        return out
