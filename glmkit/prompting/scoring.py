"""Multiple choice by option log-likelihood: each option is scored as a continuation of the prompt and a softmax over
the options' scores is the answer distribution (its maximum the confidence).

Two ways to score an option (lm-evaluation-harness's multiple-choice ``acc`` / ``acc_norm``, Brown et al. 2020 §2):

* ``letter``: the prompt ends where the answer letter starts (``...Answer: (``) and the continuation is what the
  template writes after it for that letter (``B)``), so every option costs about the same tokens;
* ``text``: the prompt's answer cue without its letter opening (``...Answer:``) continued by the option's own text;
  longer texts have lower log-likelihoods, so ``normalise`` divides by the text's characters (``char``) or tokens
  (``token``) before the softmax.

The template's abstain option (``(X) I am not sure``) is scored like any other when the rule is on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .templates import Template
from .types import ABSTAIN, LanguageModel, Question

OptionMode = Literal["letter", "text"]
Normalise = Literal["none", "token", "char"]


@dataclass
class OptionScores:
    """One question's scored options: the requests sent, raw (log-prob, tokens) per letter and the distribution."""

    requests: dict[str, tuple[str, str]]
    loglik: dict[str, tuple[float, int]] = field(default_factory=dict)
    distribution: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> str:
        """The most probable letter (the first in option order on a tie)."""
        return max(self.distribution, key=lambda k: self.distribution[k])


def option_texts(template: Template, q: Question) -> dict[str, str]:
    """The options a model chooses among: the question's, plus the abstain option when the rule is on."""
    options = dict(q.options)
    if template.abstain is not None and template.abstain.letter:
        options[template.abstain.letter] = template.abstain.text
    return options


def option_requests(template: Template, q: Question, prompt: str, mode: OptionMode) -> dict[str, tuple[str, str]]:
    """(context, continuation) per option letter for a prompt that ends at the template's answer cue."""
    if mode == "letter":
        return {k: (prompt, template.continuation_for(k)) for k in option_texts(template, q)}
    if mode != "text":
        raise ValueError(f"option mode: expected 'letter' or 'text', got {mode!r}")
    cue = template.answer_cue
    stem = prompt[: len(prompt) - len(cue.rstrip(" "))] if prompt.endswith(cue.rstrip(" ")) else prompt
    context = stem + cue.rstrip(" ([（【").rstrip()
    sep = "" if template.language == "zh" else " "
    return {k: (context, sep + text) for k, text in option_texts(template, q).items()}


def softmax(scores: Mapping[str, float]) -> dict[str, float]:
    top = max(scores.values())
    weights = {k: math.exp(v - top) for k, v in scores.items()}
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def normalised(loglik: Mapping[str, tuple[float, int]], requests: Mapping[str, tuple[str, str]], how: Normalise):
    """Each option's score: the summed log-probability, or it per character or per token."""
    if how == "none":
        return {k: lp for k, (lp, _) in loglik.items()}
    if how == "token":
        return {k: lp / max(n, 1) for k, (lp, n) in loglik.items()}
    if how == "char":
        return {k: lp / max(len(requests[k][1].strip()), 1) for k, (lp, _) in loglik.items()}
    raise ValueError(f"normalise: expected 'none', 'token' or 'char', got {how!r}")


def score_options(
    lm: LanguageModel,
    template: Template,
    q: Question,
    prompt: str,
    mode: OptionMode = "letter",
    normalise: Normalise = "none",
) -> OptionScores:
    """Score every option of ``q`` after ``prompt`` in one backend call (``BackendError`` passes through)."""
    if not q.is_multiple_choice:
        raise ValueError(f"question {q.id!r}: log-likelihood scoring needs options; it is an open question")
    requests = option_requests(template, q, prompt, mode)
    letters = list(requests)
    scores = OptionScores(requests)
    scores.loglik = dict(zip(letters, lm.loglikelihood([requests[k] for k in letters]), strict=True))
    scores.distribution = softmax(normalised(scores.loglik, requests, normalise))
    return scores


def answer_of(template: Template, letter: str) -> str:
    """A chosen letter as an answer: the abstain option's letter means ``ABSTAIN``."""
    return ABSTAIN if template.abstain is not None and letter == template.abstain.letter else letter
