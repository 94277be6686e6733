"""Request parameters with vLLM's names (the OpenAI API, vLLM's extras, Triton's vLLM backend), mapped onto
``GenerationConfig`` so the engine sees transformers' semantics.

Mapping: ``temperature == 0`` is greedy; a temperature in (0, ``MIN_TEMPERATURE``) is raised to it as vLLM does
(logits divided by a tiny temperature overflow to inf and the probabilities to NaN; at 0.01 sampling is all but
greedy already); otherwise sampling with ``top_k`` off unless given (vLLM's default, not transformers' 50);
``min_tokens`` → ``min_new_tokens``; ``stop`` → ``stop_strings`` (the text is cut before the stop string unless
``include_stop_str_in_output``); ``stop_token_ids`` join the stop ids; ``seed`` seeds the request's own generator
(choice ``i`` of ``n`` uses ``seed + i``). Beam search: ``use_beam_search`` with ``best_of``/``n`` as the width, or
``num_beams`` directly. Penalties glmkit does not implement are refused rather than ignored. Every bad value is a
``ValueError`` naming the field (HTTP 400).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import SpecialTokens
from ..generate.config import GenerationConfig
from ..prompts import layout

MIN_TEMPERATURE = 0.01  # vLLM's _MAX_TEMP: the smallest temperature that samples; below it, only 0 (greedy)


@dataclass
class Limits:
    """Server-side request limits (``glmkit serve`` flags)."""

    max_tokens: int = 256
    max_prompt_tokens: int = 2048
    max_n: int = 8


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    use_beam_search: bool = False
    best_of: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any], limits: Limits, default_max_tokens: int = 16) -> SamplingParams:
        """Known keys of ``d`` (others are ignored, as vLLM does); ``None`` values mean "default"."""
        p = cls(max_tokens=min(default_max_tokens, limits.max_tokens))
        for key in cls.__dataclass_fields__:
            value = d.get(key)
            if value is not None:
                setattr(p, key, value)
        for key in ("presence_penalty", "frequency_penalty"):
            if d.get(key) not in (None, 0, 0.0):
                raise ValueError(f"{key}: not supported by glmkit (use repetition_penalty)")
        if d.get("logit_bias"):
            raise ValueError("logit_bias: not supported by glmkit")
        p.validate(limits)
        return p

    def validate(self, limits: Limits) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _int("max_tokens", self.max_tokens, 1, limits.max_tokens)
        _int("n", self.n, 1, limits.max_n)
        _int("min_tokens", self.min_tokens, 0, self.max_tokens)
        _int("top_k", self.top_k, -1, None)
        _int("num_beams", self.num_beams, 1, 16)
        _int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, None)
        if self.best_of is not None:
            _int("best_of", self.best_of, 1, 16)
            if self.best_of > 1 and not self.use_beam_search:
                raise ValueError("best_of: only supported with use_beam_search (vLLM removed best_of sampling)")
        if self.seed is not None:
            _int("seed", self.seed, 0, 2**63 - 1 - limits.max_n)
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, 20)
        _float("temperature", self.temperature, 0.0, 100.0)
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        _float("top_p", self.top_p, 1e-9, 1.0)
        _float("min_p", self.min_p, 0.0, 1.0)
        _float("typical_p", self.typical_p, 1e-9, 1.0)
        _float("repetition_penalty", self.repetition_penalty, 1e-9, 100.0)
        _float("length_penalty", self.length_penalty, -100.0, 100.0)
        for name in ("ignore_eos", "include_stop_str_in_output", "use_beam_search", "early_stopping"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a boolean")
        if (
            not isinstance(self.stop, list)
            or not all(isinstance(s, str) and s for s in self.stop)
            or len(self.stop) > 8
        ):
            raise ValueError("stop: expected a non-empty string or a list of up to 8 non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids: expected a list of non-negative ints")
        if self.beams > 1 and self.n > self.beams:
            raise ValueError(f"n: {self.n} exceeds the beam width {self.beams}")

    @property
    def beams(self) -> int:
        width = max(self.best_of or 1, self.n) if self.use_beam_search else 1
        return max(width, self.num_beams)

    def generation_config(
        self,
        special: SpecialTokens,
        index: int = 0,
        vocab_size: int | None = None,
        default_stops: list[int] | None = None,
    ) -> GenerationConfig:
        """Settings of choice ``index`` (a beam job returns all ``n`` at once). ``stop_token_ids`` add to
        ``default_stops`` (the model's, ``glmkit.prompts.model_stop_ids``; default GLM's layout's)."""
        if vocab_size is not None and any(t >= vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: ids must be < the vocabulary size {vocab_size}")
        eos = None
        if self.stop_token_ids:
            base = default_stops if default_stops is not None else layout(special).stop_ids()
            eos = list(dict.fromkeys([*base, *self.stop_token_ids]))
        kw: dict[str, Any] = dict(
            max_new_tokens=self.max_tokens,
            min_new_tokens=self.min_tokens,
            repetition_penalty=float(self.repetition_penalty),
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            stop_strings=list(self.stop) or None,
            eos_token_id=eos,
        )
        if self.beams > 1:
            kw.update(num_beams=self.beams, num_return_sequences=self.n, length_penalty=float(self.length_penalty))
            kw.update(early_stopping=self.early_stopping)
        elif self.temperature > 0:
            kw.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p))
            kw.update(top_k=self.top_k if self.top_k > 0 else None, typical_p=float(self.typical_p))
            kw.update(min_p=float(self.min_p) if self.min_p > 0 else None)
            kw.update(seed=None if self.seed is None else self.seed + index)
        return GenerationConfig(**kw)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(name: str, v: Any, low: int, high: int | None) -> None:
    if not _is_int(v) or v < low or (high is not None and v > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected an int {bound}, got {v!r}")


def _float(name: str, v: Any, low: float, high: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= float(v) <= high:
        raise ValueError(f"{name}: expected a number in [{low}, {high}], got {v!r}")
