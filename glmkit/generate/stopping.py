"""When a row stops, and why: stop ids, stop strings, ``max_new_tokens`` and the position-table limit.

transformers ORs its stopping criteria into one boolean per row (transformers ``generation/stopping_criteria.py``);
we do the same and also keep the reason, because callers (streaming, serving, the CLI) must tell "hit <eop>" from
"ran out of room". The stop token itself stays in the output, as in transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "stop_string", "length", "position_limit"]


class Decoder(Protocol):
    """The part of a tokenizer that stop strings need (glmkit and transformers tokenizers both fit)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class StopStrings:
    """True once a stop string appears in the generated text and overlaps the newest token.

    This is transformers' ``StopStringCriteria`` rule (the match must include part of the last token), evaluated
    on decoded text of the generated tokens only; a window of recent tokens bounds the decoding cost.
    """

    def __init__(self, stop_strings: Sequence[str], tokenizer: Decoder) -> None:
        self.stop_strings, self.tokenizer = list(stop_strings), tokenizer
        self.window = 2 * max(len(s) for s in self.stop_strings) + 4  # tokens; each decodes to >= ~1 char

    def __call__(self, generated: Sequence[int]) -> bool:
        if not generated:
            return False
        window = list(generated[-self.window :])
        now = self.tokenizer.decode(window, skip_special_tokens=False)
        before = self.tokenizer.decode(window[:-1], skip_special_tokens=False)
        return any(s in now and s not in before for s in self.stop_strings)


class StopCriteria:
    """Which rows of ``ids [M, prompt_length + t]`` must stop after their newest token.

    ``max_new`` is the number of tokens allowed; ``limited_by_positions`` says that the position table, not
    ``max_new_tokens``, set it (the reason is then ``"position_limit"``).
    """

    def __init__(
        self,
        prompt_length: int,
        max_new: int,
        eos_ids: Sequence[int],
        stop_strings: StopStrings | None = None,
        limited_by_positions: bool = False,
    ) -> None:
        self.prompt_length, self.max_new = prompt_length, max_new
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long)
        self.stop_strings = stop_strings
        self.length_reason: FinishReason = "position_limit" if limited_by_positions else "length"

    @property
    def max_length(self) -> int:
        return self.prompt_length + self.max_new

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([r is not None for r in self.reasons(ids)], device=ids.device)

    def reasons(self, ids: torch.Tensor) -> list[FinishReason | None]:
        """Per row: why it stops now, or ``None``. A stop id wins over a stop string, which wins over length."""
        hit_eos = torch.isin(ids[:, -1], self.eos.to(ids.device)).tolist() if self.eos.numel() else [False] * len(ids)
        at_max = ids.shape[1] >= self.max_length
        out: list[FinishReason | None] = []
        for m, eos in enumerate(hit_eos):
            if eos:
                out.append("stop")
            elif self.stop_strings is not None and self.stop_strings(ids[m, self.prompt_length :].tolist()):
                out.append("stop_string")
            else:
                out.append(self.length_reason if at_max else None)
        return out
