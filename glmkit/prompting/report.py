"""The evaluation report: counts, accuracy with 95 % bootstrap intervals, selective prediction (accuracy at coverage,
AURC, abstention rate), calibration (ECE, Brier, reliability bins), per-subject accuracy, and the two plots.

Which questions count: a failed question (the backend gave no answer after its retries) is left out of every metric
and counted under ``failed``; a question without a gold answer is left out of the accuracy metrics. An abstention
or an unparsed answer counts as an error unless abstaining is the gold answer (a false premise). Open questions
(no options) are reported apart: exact match and token F1 against their reference answers.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import selective as sel
from .types import ABSTAIN, Prediction, Question

COVERAGES = (1.0, 0.8, 0.5)


def _interval(o: sel.Outcomes, statistic, resamples: int, seed: int) -> dict[str, Any]:
    low, high = sel.bootstrap_ci(len(o), lambda i: statistic(o.take(i)), resamples=resamples, seed=seed)
    return {"value": _num(statistic(o)), "ci95": [_num(low), _num(high)]}


def _num(x: float) -> float | None:
    """JSON has no NaN: an undefined metric (no question to compute it on) is null."""
    return None if x is None or np.isnan(x) else round(float(x), 6)


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token-overlap F1 (Rajpurkar et al., 2016) over lowercase word tokens."""
    p, r = _tokens(prediction), _tokens(reference)
    common = sum((Counter(p) & Counter(r)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def mc_outcomes(questions: Sequence[Question], predictions: Sequence[Prediction]) -> sel.Outcomes:
    """Outcomes of the multiple-choice questions that have a gold answer and did not fail."""
    rows = [
        (p.answer == q.answer, p.confidence, not p.abstained)
        for q, p in zip(questions, predictions, strict=True)
        if q.is_multiple_choice and q.answer is not None and p.failed is None
    ]
    return sel.Outcomes.of(*zip(*rows, strict=True)) if rows else sel.Outcomes.of([], [], [])


def build_report(
    questions: Sequence[Question],
    predictions: Sequence[Prediction],
    *,
    resamples: int = 1000,
    seed: int = 0,
    coverages: Sequence[float] = COVERAGES,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Every metric of the run (``config``, timing and names are added by the harness)."""
    pairs = list(zip(questions, predictions, strict=True))
    failed = [(q, p) for q, p in pairs if p.failed is not None]
    done = [(q, p) for q, p in pairs if p.failed is None]
    mc = [(q, p) for q, p in done if q.is_multiple_choice and q.answer is not None]
    o = mc_outcomes(questions, predictions)
    report: dict[str, Any] = {
        "n": len(pairs),
        "evaluated": len(done),
        "answered": sum(not p.abstained for _, p in done),
        "abstained": sum(p.answer == ABSTAIN for _, p in done),
        "unparsed": sum(p.answer is None for _, p in done),
        "failed": len(failed),
        "abstention_rate": _num(sel.abstention_rate(o)),
        "accuracy": _interval(o, sel.accuracy, resamples, seed),
        "selective_accuracy": _num(o.correct[o.answered].mean()) if o.answered.any() else None,
        "accuracy_at_coverage": {
            str(float(c)): _interval(o, lambda x, c=c: sel.accuracy_at_coverage(x, c), resamples, seed)
            for c in coverages
        },
        "aurc": _num(sel.aurc(o)),
        "ece": {"uniform": _num(sel.ece(o, n_bins, "uniform")), "quantile": _num(sel.ece(o, n_bins, "quantile"))},
        "brier": _num(sel.brier([p.distribution for _, p in mc], [q.answer for q, _ in mc])),
        "reliability": sel.reliability_bins(o, n_bins, "uniform"),
        "confidence_kind": sorted({p.confidence_kind for _, p in done}),
        "per_subject": _per_subject(mc),
        "citations": {
            "with_citations": sum(bool(p.cited) for _, p in done),
            "all_cited_ids_given": sum(bool(p.cited) and p.citations_ok for _, p in done),
        },
        "failures": [{"id": q.id, "line": q.line, "reason": p.failed} for q, p in failed],
    }
    open_done = [(q, p) for q, p in done if not q.is_multiple_choice and q.reference]
    if open_done:
        answers = [(p.answer if p.answer not in (None, ABSTAIN) else "", q.reference or "") for q, p in open_done]
        report["open"] = {
            "n": len(open_done),
            "exact_match": _num(np.mean([" ".join(_tokens(a)) == " ".join(_tokens(r)) for a, r in answers])),
            "token_f1": _num(np.mean([token_f1(a, r) for a, r in answers])),
        }
    return report


def _per_subject(mc: list[tuple[Question, Prediction]]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for q, p in mc:
        groups[q.subject or "(none)"].append(p.answer == q.answer)
    return {s: {"n": len(v), "accuracy": _num(float(np.mean(v)))} for s, v in sorted(groups.items())}


def plot_risk_coverage(o: sel.Outcomes, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    if len(o):
        coverage, risk = sel.risk_coverage(o)
        ax.plot(coverage, risk, marker="." if len(o) < 60 else None)
        ax.set_title(f"{title}  AURC {sel.aurc(o):.3f}".strip(), fontsize=9)
    ax.set(xlabel="coverage (most confident first)", ylabel="risk (error rate)", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(o: sel.Outcomes, path: Path, n_bins: int = 10, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for b in sel.reliability_bins(o, n_bins, "uniform"):
        ax.bar(
            b["low"], b["accuracy"], width=b["high"] - b["low"], align="edge", color="C0", alpha=0.7, edgecolor="black"
        )
        ax.text(b["low"] + (b["high"] - b["low"]) / 2, b["accuracy"] + 0.01, str(b["count"]), ha="center", fontsize=7)
    ece = sel.ece(o, n_bins, "uniform")
    ax.set_title(f"{title}  ECE {ece:.3f}".strip() if not np.isnan(ece) else title, fontsize=9)
    ax.set(xlabel="confidence", ylabel="accuracy (bar labels: questions)", xlim=(0, 1), ylim=(0, 1.05))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
