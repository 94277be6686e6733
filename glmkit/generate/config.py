"""Generation settings: one validated dataclass with transformers' knob names, meanings and defaults.

Keeping Hugging Face's names and defaults (transformers ``GenerationConfig``; docs/generation-semantics.md) lets a
caller move a ``generate`` call between transformers and glmkit unchanged, and lets the parity tests pass the same
dict to both. Bad values raise ``ValueError`` naming the parameter at construction time, before any model work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class GenerationConfig:
    """How to decode. Every field has transformers 5.x's meaning; defaults are transformers' defaults.

    Attributes:
        max_new_tokens: generated tokens at most (the Part-B span length, ``<sop>`` not counted).
        min_new_tokens: stop ids are banned until this many tokens were generated.
        min_length: stop ids are banned while the whole sequence (prompt, ``<sop>``, generated) is shorter.
        do_sample: sample from the processed distribution instead of taking the argmax.
        num_beams: beam width; 1 = greedy or sampling.
        temperature / top_k / top_p / min_p / typical_p: sampling warpers (only used when ``do_sample``);
            ``top_k`` defaults to 50 like transformers, ``None`` or 0 disables it.
        repetition_penalty: CTRL penalty on every token already in the sequence (prompt included).
        no_repeat_ngram_size: ban any token that would repeat an n-gram of the sequence.
        length_penalty: beam score = sum of log-probs / generated_length ** length_penalty.
        early_stopping: beam search stop rule: True, False (heuristic) or "never".
        num_return_sequences: sequences returned per prompt (beams, or independent samples).
        eos_token_id: stop id(s); ``None`` = the model's ``<eop>`` and ``<eos>``.
        pad_token_id: fills finished rows; ``None`` = the special tokens' pad id.
        stop_strings: stop once the generated text contains one of these (needs a tokenizer).
        seed: seed a private ``torch.Generator`` for sampling; ``None`` = the global RNG, like transformers.
        compile: ``torch.compile`` the one-token decode step; True = inductor, or a backend name.
        kernels: decode on glmkit's C++ kernels where they run (``optimize_for_decode``: the model's linear layers
            and LM head are swapped, in place, for modules with the same parameters, state dict and function);
            False leaves the model as it is.
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    min_length: int = 0
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    seed: int | None = None
    compile: bool | str = False
    kernels: bool = True

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams", "num_return_sequences"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("min_new_tokens", "min_length", "no_repeat_ngram_size"):
            _check_int(name, getattr(self, name), low=0)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, low=0)
        _check_float("temperature", self.temperature, lambda v: v > 0, "a float > 0 (use do_sample=False for greedy)")
        _check_float("top_p", self.top_p, lambda v: 0 < v <= 1, "a float in (0, 1]")
        _check_float("typical_p", self.typical_p, lambda v: 0 < v <= 1, "a float in (0, 1]")
        if self.min_p is not None:
            _check_float("min_p", self.min_p, lambda v: 0 <= v <= 1, "a float in [0, 1]")
        _check_float("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "a float > 0")
        _check_float("length_penalty", self.length_penalty, lambda v: True, "a float")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping: expected True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ValueError(
                f"num_return_sequences: greedy search returns one sequence per prompt, got {self.num_return_sequences}"
                " (use num_beams >= num_return_sequences or do_sample=True)"
            )
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences: {self.num_return_sequences} must be <= num_beams={self.num_beams}")
        if self.eos_token_id is not None:
            ids = [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)
            if not ids or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
                raise ValueError(
                    f"eos_token_id: expected a non-negative int or a non-empty list of them, got {self.eos_token_id!r}"
                )
        if self.pad_token_id is not None:
            _check_int("pad_token_id", self.pad_token_id, low=0)
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if self.stop_strings is not None and (not self.stop_strings or not all(self.stop_strings)):
            raise ValueError(f"stop_strings: expected non-empty strings, got {self.stop_strings!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
        if not isinstance(self.kernels, bool):
            raise ValueError(f"kernels: expected True or False, got {self.kernels!r}")
        if not isinstance(self.compile, (bool, str)):
            raise ValueError(f"compile: expected a bool or a torch.compile backend name, got {self.compile!r}")

    def eos_ids(self) -> list[int]:
        """The stop ids as a list (empty when unset)."""
        return as_id_list(self.eos_token_id)

    @classmethod
    def from_kwargs(cls, base: GenerationConfig | None = None, **kwargs: Any) -> GenerationConfig:
        """``base`` (or the defaults) updated with ``kwargs``; an unknown keyword raises ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown generation parameter(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _check_int(name: str, value: object, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def _check_float(name: str, value: object, ok, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def as_id_list(ids: int | Sequence[int] | None) -> list[int]:
    """``None`` → ``[]``, an int → ``[int]``, a sequence → a list."""
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)
