"""The types knowledge-guided prompting passes around: questions, knowledge snippets, exemplars, predictions, and the
two things a language model backend must do (generate text, score a continuation), as lm-evaluation-harness's
``generate_until`` and ``loglikelihood`` requests split them.

A question is multiple choice when it has ``options`` ({letter: text}, in order) and open when it has none; its
``answer`` is the gold letter, ``ABSTAIN`` where declining is the right answer (a false premise), or ``None`` when
unknown. Confidence is always a number in [0, 1] whose definition the report states (``Prediction.confidence_kind``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

ABSTAIN = "ABSTAIN"
ConfidenceKind = Literal["max_prob", "vote_share", "none"]


@dataclass(frozen=True)
class Question:
    """One evaluation item. ``line`` is its 1-based line in the file it came from (0 when built in code)."""

    id: str
    question: str
    options: Mapping[str, str] = field(default_factory=dict)
    answer: str | None = None
    reference: str | None = None  # an open question's reference answer
    context: str | None = None  # e.g. PubMedQA's abstract
    subject: str | None = None
    qtype: str | None = None  # question type, for stratified exemplar selection
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    line: int = 0

    @property
    def letters(self) -> list[str]:
        return list(self.options)

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)


@dataclass(frozen=True)
class Snippet:
    """A piece of knowledge given in the prompt; a model's answer cites it by ``id``."""

    id: str
    text: str
    citation: str = ""  # where it comes from, e.g. "Genesis 1:3"
    score: float = 0.0  # the retriever's score


@dataclass(frozen=True)
class Exemplar:
    """A solved question shown in the prompt; ``explanation`` is its chain of thought (None for plain few-shot)."""

    question: Question
    explanation: str | None = None


@dataclass
class Prediction:
    """What a strategy answered for one question, with everything the report and the jsonl log need."""

    question_id: str
    answer: str | None  # a letter, ABSTAIN, free text for open questions, or None (unparsed / failed)
    confidence: float
    confidence_kind: ConfidenceKind
    distribution: dict[str, float] = field(default_factory=dict)  # over letters (and ABSTAIN)
    votes: dict[str, int] = field(default_factory=dict)  # self-consistency / ensemble refinement
    prompts: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # every raw sample
    cited: list[str] = field(default_factory=list)  # snippet ids the answer cited
    citations_ok: bool = True  # every cited id was among the snippets given
    failed: str | None = None  # why the backend gave no answer (after its retries)
    n_calls: int = 0
    seconds: float = 0.0

    @property
    def abstained(self) -> bool:
        return self.answer == ABSTAIN or self.answer is None


class BackendError(RuntimeError):
    """A backend could not answer (after its own bounded retries); the harness marks the sample failed."""


class LanguageModel(Protocol):
    """A model the harness can prompt: in process, through transformers, or over HTTP."""

    name: str

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        n: int = 1,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[str]]:
        """``n`` completions per prompt (greedy when ``temperature`` is 0)."""
        ...

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """For each (context, continuation): the continuation's summed log-probability and its token count."""
        ...
