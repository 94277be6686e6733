"""``run_eval``: put every question to a strategy and write what happened to ``out``:

* ``predictions.jsonl``: one line per question as it is answered (every prompt and raw output, the parsed answer,
  its confidence and distribution, votes, citations and whether they check, the failure reason) — flushed line by
  line, so an interrupted run keeps its answers and ``resume=True`` picks up after the last one written;
* ``run.json``: the settings, written first (what ``resume`` checks);
* ``report.json``: the metrics (``report.build_report``), the counts of calls and seconds, the config, template and
  backend; ``risk_coverage.png`` and ``reliability.png``.

A backend failure never stops the run: the strategy marks that question failed and the report lists it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import COVERAGES, build_report, mc_outcomes, plot_reliability, plot_risk_coverage
from .strategies import Strategy
from .types import Prediction, Question

PREDICTIONS, REPORT, RUN = "predictions.jsonl", "report.json", "run.json"
RISK_COVERAGE_PNG, RELIABILITY_PNG = "risk_coverage.png", "reliability.png"


@dataclass
class EvalConfig:
    """Where to write, how to compute the intervals, and what to record as the run's settings (``settings``)."""

    out: Path
    resamples: int = 1000
    seed: int = 0
    coverages: tuple[float, ...] = COVERAGES
    n_bins: int = 10
    progress: bool = True
    resume: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    skipped_rows: list[str] = field(default_factory=list)  # the data file's malformed rows, named by line


def prediction_row(q: Question, p: Prediction) -> dict[str, Any]:
    row = {"id": q.id, "line": q.line, "subject": q.subject, "gold": q.answer, "correct": None}
    if q.answer is not None and p.failed is None:
        row["correct"] = p.answer == q.answer
    return row | {k: v for k, v in dataclasses.asdict(p).items() if k != "question_id"}


def _resumed(path: Path, questions: Sequence[Question], settings: dict[str, Any]) -> dict[str, Prediction]:
    """The predictions an earlier run with the same settings wrote (its last line may be cut short)."""
    done: dict[str, Prediction] = {}
    run = path.parent / RUN
    if not run.is_file() or json.loads(run.read_text(encoding="utf-8")) != settings:
        raise ValueError(f"{path.parent}: resume: the earlier run used other settings ({RUN}); use another --out")
    names = {f.name for f in dataclasses.fields(Prediction)} - {"question_id"}
    wanted = {q.id for q in questions}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("id") in wanted and row.get("failed") is None:
            kept = {k: v for k, v in row.items() if k in names}
            done[row["id"]] = Prediction(question_id=row["id"], **kept)
    return done


def run_eval(questions: Sequence[Question], strategy: Strategy, config: EvalConfig) -> dict[str, Any]:
    """Answer ``questions`` with ``strategy``; write and return the report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not questions:
        raise ValueError("questions: nothing to evaluate (the data file has no valid question)")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"questions: the id {dup!r} is used twice; ids name the rows of {PREDICTIONS}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PREDICTIONS
    settings = {**config.settings, "strategy": dataclasses.asdict(strategy.config), "template": strategy.template.name}
    done = _resumed(path, questions, settings) if config.resume and path.is_file() else {}
    (out / RUN).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    start = time.perf_counter()
    predictions: list[Prediction] = []
    columns = [TextColumn("prompt-eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with path.open("w", encoding="utf-8") as f, Progress(*columns, disable=not config.progress) as bar:
        task = bar.add_task("questions", total=len(questions))
        for q in questions:
            p = done.get(q.id) or strategy.predict(q)
            predictions.append(p)
            f.write(json.dumps(prediction_row(q, p), ensure_ascii=False) + "\n")
            f.flush()
            bar.advance(task)
    report = build_report(
        questions, predictions, resamples=config.resamples, seed=config.seed, coverages=config.coverages
    )
    report |= {
        "calls": sum(p.n_calls for p in predictions),
        "seconds": round(time.perf_counter() - start, 3),
        "question_seconds": round(sum(p.seconds for p in predictions), 3),
        "resumed": len(done),
        "skipped_rows": config.skipped_rows,
        "template": strategy.template.name,
        "backend": strategy.lm.name,
        "config": settings,
    }
    (out / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    o = mc_outcomes(questions, predictions)
    title = f"{strategy.template.name} · {strategy.config.method}"
    plot_risk_coverage(o, out / RISK_COVERAGE_PNG, title)
    plot_reliability(o, out / RELIABILITY_PNG, config.n_bins, title)
    return report
