"""Greedy and multinomial decoding over any next-token ``Stepper``: transformers' ``_sample`` loop.

The loop is independent of GLM: a ``Stepper`` feeds one token per row and returns the next logits. That lets
the same code run the GLM model (engine.py) and the table models of the test vectors. RNG use is exactly
transformers': one ``torch.multinomial(softmax(scores), 1)`` over the whole ``[rows, V]`` matrix per step,
finished rows included, so a seeded run reproduces ``transformers.generate`` token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from .processors import Processor, apply_processors
from .stopping import FinishReason, StopCriteria


class Stepper(Protocol):
    """Next-token logits source. ``step(None)`` starts generation; ``step(tokens [N])`` feeds one token per row."""

    def step(self, tokens: torch.Tensor | None) -> torch.Tensor: ...

    def reorder(self, index: torch.Tensor) -> None: ...


class SampleRun:
    """Iterate to decode: each item is the ``[N]`` tensor of this step's tokens (pad for finished rows).

    After the iteration ``ids`` holds prompt + generated tokens, ``reasons`` why each row stopped and
    ``lengths`` how many tokens each row generated (its stop token included).
    """

    def __init__(
        self,
        stepper: Stepper,
        ids: torch.Tensor,
        stop: StopCriteria,
        processors: list[Processor],
        *,
        do_sample: bool,
        pad_id: int,
        generator: torch.Generator | None = None,
    ) -> None:
        self.stepper, self.ids, self.stop, self.processors = stepper, ids, stop, processors
        self.do_sample, self.pad_id, self.generator = do_sample, pad_id, generator
        self.reasons: list[FinishReason | None] = [None] * ids.shape[0]
        self.lengths = [0] * ids.shape[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        N = self.ids.shape[0]
        unfinished = torch.ones(N, dtype=torch.bool, device=self.ids.device)
        logits = self.stepper.step(None)
        while True:
            scores = apply_processors(self.processors, self.ids, logits.float())
            if self.do_sample:
                probs = torch.nn.functional.softmax(scores, dim=-1)
                tokens = torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
            else:
                tokens = torch.argmax(scores, dim=-1)
            tokens = torch.where(unfinished, tokens, self.pad_id)
            self.ids = torch.cat([self.ids, tokens[:, None]], dim=-1)
            running = unfinished.tolist()
            for n, reason in enumerate(self.stop.reasons(self.ids)):
                if running[n]:
                    self.lengths[n] += 1
                    if reason is not None:
                        self.reasons[n] = reason
                        unfinished[n] = False
            yield tokens
            if not bool(unfinished.any()):
                return
            logits = self.stepper.step(tokens)
