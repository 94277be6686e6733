"""How a question is put to a model and its answer read back (Med-PaLM §3, Med-PaLM 2 §3.3):

* ``loglik``: every option scored by log-likelihood (scoring.py); the answer is the most probable option and the
  confidence its probability. With a chain-of-thought template the explanation is generated (greedy) first and the
  options are scored after it and the answer cue.
* ``generate`` / ``cot``: one greedy completion, the answer extracted by the template (``cot`` needs a CoT template).
* ``self-consistency`` (Wang et al., 2022): ``samples`` completions at ``temperature``, a plurality vote over the
  extracted answers; the confidence is the agreement, the winner's votes / ``samples`` (unparsed samples count in
  the denominator, so a model that rarely answers legibly is not confident).
* ``ensemble`` (Med-PaLM 2's ensemble refinement): ``samples`` reasonings at ``temperature``, then ``samples`` more
  answers conditioned on them (``Template.render_refinement``), voted as above.

Tie rule of a vote: among the answers with the most votes, the one sampled first wins (deterministic for a seed).
Every strategy can put ``shots`` exemplars (an ``ExemplarSelector``) and ``snippets`` knowledge snippets (a
``KnowledgeSource``) in the prompt, and applies the template's abstain rule (the abstain option or phrases) and,
when ``threshold`` is set, abstains below that confidence. An open question gets a generated answer text. A backend
failure (``BackendError``, retries spent) makes a ``Prediction`` with ``failed`` set, never an exception.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .exemplars import ExemplarSelector
from .knowledge import KnowledgeSource
from .scoring import Normalise, OptionMode, answer_of, score_options
from .templates import Template, check_citations
from .types import ABSTAIN, BackendError, Exemplar, LanguageModel, Prediction, Question, Snippet

Method = Literal["loglik", "generate", "cot", "self-consistency", "ensemble"]
METHODS: tuple[str, ...] = ("loglik", "generate", "cot", "self-consistency", "ensemble")


@dataclass
class StrategyConfig:
    """How to prompt. ``max_tokens`` 0 = a default for the kind of answer (direct letter 8, reasoning 192, open 96)."""

    method: Method = "loglik"
    shots: int = 0
    snippets: int = 0
    samples: int = 5
    temperature: float = 0.7
    max_tokens: int = 0
    option_mode: OptionMode = "letter"
    normalise: Normalise = "none"
    threshold: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("shots", "snippets", "max_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {getattr(self, name)!r}")
        if self.samples < 1:
            raise ValueError(f"samples: expected an int >= 1, got {self.samples!r}")
        if self.method in ("self-consistency", "ensemble") and not self.temperature > 0:
            raise ValueError(f"temperature: {self.method} samples, so it needs a temperature > 0")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold: expected a confidence in [0, 1], got {self.threshold!r}")


def vote(answers: Sequence[str | None]) -> tuple[str | None, dict[str, int]]:
    """The plurality answer of ``answers`` (``None`` = unparsed, never a candidate) and the vote counts; on a tie
    the tied answer that appears first wins. ``(None, {})`` when nothing parsed."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, {}
    top = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == top)
    return winner, dict(counts)


class Strategy:
    """Answers questions with one method over one backend and template."""

    def __init__(
        self,
        lm: LanguageModel,
        template: Template,
        config: StrategyConfig | None = None,
        *,
        exemplars: ExemplarSelector | None = None,
        knowledge: KnowledgeSource | None = None,
    ) -> None:
        self.lm, self.template, self.config = lm, template, config or StrategyConfig()
        self.exemplars, self.knowledge = exemplars, knowledge
        c = self.config
        if c.shots and exemplars is None:
            raise ValueError(f"shots: {c.shots} exemplars asked for but no exemplar source given (--exemplars FILE)")
        if c.snippets and knowledge is None:
            raise ValueError(f"snippets: {c.snippets} snippets asked for but no knowledge source given (--knowledge)")
        if c.method in ("cot", "ensemble") and not template.cot:
            raise ValueError(
                f"method {c.method}: needs a chain-of-thought template (e.g. mc-cot-en), not {template.name}"
            )
        if c.method == "ensemble" and template.refinement is None:
            raise ValueError(f"method ensemble: template {template.name} has no refinement section")
        if c.method == "loglik" and template.kind != "multiple_choice":
            raise ValueError(f"method loglik: scores options, but template {template.name} is for open questions")
        self.calls = 0

    def _context(self, q: Question) -> tuple[list[Exemplar], list[Snippet]]:
        c = self.config
        shots = self.exemplars.select(q, c.shots) if c.shots and self.exemplars is not None else []
        query = " ".join([q.question, *q.options.values()])
        snippets = self.knowledge.retrieve(query, c.snippets) if c.snippets and self.knowledge is not None else []
        return shots, snippets

    def _stop(self) -> list[str]:
        marker = self.template.question_marker
        if self.template.cot or self.template.kind == "open":
            return ["\n" + marker] if marker else []
        return ["\n"]

    def _max_tokens(self, reasoning: bool) -> int:
        if self.config.max_tokens:
            return self.config.max_tokens
        return 192 if reasoning else (96 if self.template.kind == "open" else 8)

    def _generate(self, p: Prediction, prompt: str, n: int, temperature: float) -> list[str]:
        p.prompts.append(prompt)
        self.calls += 1
        p.n_calls += 1
        # a question's samples follow from the run's seed, its id and the stage: not from which questions ran before
        seed = (self.config.seed * 1_000_003 + zlib.crc32(p.question_id.encode()) + p.n_calls) % 2**31
        reasoning = self.template.cot
        texts = self.lm.generate(
            [prompt],
            max_tokens=self._max_tokens(reasoning),
            temperature=temperature,
            n=n,
            stop=self._stop(),
            seed=seed if temperature > 0 else None,
        )[0]
        p.outputs += texts
        return texts

    def predict(self, q: Question) -> Prediction:
        """One question's prediction; a backend failure is recorded in ``failed``."""
        start = time.perf_counter()
        kind = "max_prob" if self.config.method == "loglik" else "none"
        p = Prediction(q.id, None, 0.0, kind)
        shots, snippets = self._context(q)
        try:
            self._answer(p, q, shots, snippets)
        except BackendError as e:
            p.answer, p.confidence, p.failed = None, 0.0, str(e) or type(e).__name__
        threshold = self.config.threshold
        if threshold is not None and p.failed is None and p.answer is not None and p.confidence < threshold:
            p.answer = ABSTAIN
        p.citations_ok = check_citations(p.cited, snippets)
        p.seconds = time.perf_counter() - start
        return p

    def _answer(self, p: Prediction, q: Question, shots: list[Exemplar], snippets: list[Snippet]) -> None:
        t, c = self.template, self.config
        prompt = t.render(q, shots, snippets)
        if c.method == "loglik":
            if t.cot:  # the reasoning first, then the options scored after it and the answer cue
                explanation = self._generate(p, prompt, 1, 0.0)[0]
                _, p.cited = t.extract(explanation, q)
                prompt = f"{prompt} {explanation.strip()}{t.line_sep}{t.answer_cue}"
            p.prompts.append(prompt)
            self.calls += 1
            p.n_calls += 1
            scores = score_options(self.lm, t, q, prompt, c.option_mode, c.normalise)
            p.outputs.append(" ".join(f"{k}:{lp:.4f}/{n}" for k, (lp, n) in scores.loglik.items()))
            p.distribution = {answer_of(t, k): v for k, v in scores.distribution.items()}
            p.answer = answer_of(t, scores.best)
            p.confidence = scores.distribution[scores.best]
            return
        if c.method in ("generate", "cot"):
            text = self._generate(p, prompt, 1, 0.0)[0]
            p.answer, p.cited = t.extract(text, q)
            p.confidence = 1.0 if p.answer not in (None, ABSTAIN) else 0.0
            return
        texts = self._generate(p, prompt, c.samples, c.temperature)
        if c.method == "ensemble":
            reasonings = [x.strip() for x in texts]  # generation stopped where a next question would start
            texts = self._generate(p, t.render_refinement(q, reasonings, shots, snippets), c.samples, c.temperature)
        read = [t.extract(x, q) for x in texts]
        if not q.is_multiple_choice:  # open questions: the first legible answer; the vote is over exact texts
            read = [(a.strip() if a not in (None, ABSTAIN) else a, cited) for a, cited in read]
        p.answer, p.votes = vote([a for a, _ in read])
        p.cited = list(dict.fromkeys(x for a, cited in read if a == p.answer for x in cited))
        p.confidence = p.votes.get(p.answer, 0) / len(texts) if p.answer is not None else 0.0
        p.confidence_kind = "vote_share"
        p.distribution = {k: v / len(texts) for k, v in p.votes.items()}
