"""The evaluation harness: selective-prediction and calibration metrics against hand-computed values, the vote and
its tie rule, self-consistency and ensemble refinement over a scripted model (what each sample said is known), a
backend failure marked on its question while the run goes on, and ``glmkit prompt-eval`` end to end on the bundled
model (report.json, predictions.jsonl, the two PNGs; a template field a question lacks is named before any work)."""

from __future__ import annotations

import dataclasses
import json
import socket

import numpy as np
import pytest

from glmkit.cli import main
from glmkit.prompting import selective as sel
from glmkit.prompting.backends import OpenAIModel
from glmkit.prompting.harness import EvalConfig, run_eval
from glmkit.prompting.report import build_report
from glmkit.prompting.strategies import Strategy, StrategyConfig, vote
from glmkit.prompting.templates import load_template
from glmkit.prompting.types import ABSTAIN, BackendError, Prediction, Question
from tests.conftest import FIXTURES

MEDQA = FIXTURES / "prompting" / "medqa.jsonl"  # 3 good rows and 4 malformed ones, which the loader names
pytestmark = pytest.mark.filterwarnings("ignore:skipped. .*medqa.jsonl line:UserWarning")


def q(i: str, answer: str = "A", subject: str | None = None) -> Question:
    return Question(i, f"Who built ark number {i}?", {"A": "Noah", "B": "Moses", "C": "Aaron"}, answer, subject=subject)


# ---- metrics


def test_accuracy_coverage_risk_and_aurc_by_hand():
    o = sel.Outcomes.of([1, 0, 1, 1, 0], [0.95, 0.85, 0.75, 0.65, 0.55], [True] * 5)
    assert sel.accuracy(o) == pytest.approx(0.6)
    assert sel.accuracy_at_coverage(o, 0.4) == pytest.approx(0.5)  # top 2: right, wrong
    assert sel.accuracy_at_coverage(o, 0.6) == pytest.approx(2 / 3)
    assert sel.accuracy_at_coverage(o, 1.0) == sel.accuracy(o)
    coverage, risk = sel.risk_coverage(o)
    assert coverage.tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert risk.tolist() == pytest.approx([0, 0.5, 1 / 3, 0.25, 0.4])
    assert sel.aurc(o) == pytest.approx((0 + 0.5 + 1 / 3 + 0.25 + 0.4) / 5)


def test_ties_count_their_mean_and_abstentions_rank_last():
    tied = sel.Outcomes.of([1, 0, 1, 0], [0.8, 0.8, 0.8, 0.2], [True] * 4)
    assert sel.accuracy_at_coverage(tied, 0.5) == pytest.approx(2 / 3)  # 2 of the tie group of 3, 2/3 right
    flipped = sel.Outcomes.of([0, 1, 1, 0], [0.8, 0.8, 0.8, 0.2], [True] * 4)
    assert sel.accuracy_at_coverage(flipped, 0.5) == sel.accuracy_at_coverage(tied, 0.5)
    o = sel.Outcomes.of([0, 1, 1], [0.99, 0.6, 0.4], [False, True, True])
    assert sel.accuracy_at_coverage(o, 2 / 3) == 1.0 and sel.accuracy(o) == pytest.approx(2 / 3)
    assert sel.abstention_rate(o) == pytest.approx(1 / 3)


def test_ece_uniform_and_quantile_bins_and_brier_by_hand():
    o = sel.Outcomes.of([1, 0, 1, 1, 0], [0.95, 0.85, 0.75, 0.65, 0.55], [True] * 5)
    # one question per bin: |1-.95| + |0-.85| + |1-.75| + |1-.65| + |0-.55| = 2.05, over 5
    assert sel.ece(o, 10, "uniform") == pytest.approx(0.41)
    # two equal-count bins: {.55, .65, .75} accuracy 2/3 confidence .65; {.85, .95} accuracy 1/2 confidence .9
    assert sel.ece(o, 2, "quantile") == pytest.approx(3 / 5 * abs(2 / 3 - 0.65) + 2 / 5 * 0.4)
    bins = sel.reliability_bins(o, 4, "uniform")  # right-closed: .75 falls in (.5, .75]; empty bins left out
    assert [(b["low"], b["count"], b["accuracy"]) for b in bins] == [(0.5, 3, pytest.approx(2 / 3)), (0.75, 2, 0.5)]
    dists = [{"A": 0.7, "B": 0.2, "C": 0.1}, {"A": 0.5, "B": 0.5}, {"A": 1.0}]
    # .3²+.2²+.1² = .14; gold C absent: .5²+.5²+1 = 1.5; no gold: left out
    assert sel.brier(dists, ["A", "C", None]) == pytest.approx((0.14 + 1.5) / 2)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    o = sel.Outcomes.of([1] * 70 + [0] * 30, [0.5] * 100, [True] * 100)
    ci = sel.bootstrap_ci(100, lambda i: sel.accuracy(o.take(i)), seed=1)
    assert ci == sel.bootstrap_ci(100, lambda i: sel.accuracy(o.take(i)), seed=1)
    assert 0.58 < ci[0] < 0.65 and 0.75 < ci[1] < 0.82  # ~ 0.7 ± 1.96 · 0.046
    all_right = sel.Outcomes.of([1] * 10, [0.5] * 10, [True] * 10)
    assert sel.bootstrap_ci(10, lambda i: sel.accuracy(all_right.take(i))) == (1.0, 1.0)


def test_threshold_fitted_on_dev_reaches_the_target_coverage():
    dev = sel.Outcomes.of([1, 1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.5], [True] * 5)
    t = sel.fit_threshold(dev, 0.8)
    assert t == 0.6 and (dev.confidence >= t).mean() == 0.8
    with_abstention = sel.Outcomes.of([1, 1, 0, 1, 0], [0.9, 0.8, 0.99, 0.6, 0.5], [True, True, False, True, True])
    assert sel.fit_threshold(with_abstention, 0.8) == 0.5
    assert sel.fit_threshold(with_abstention, 1.0) == 0.0  # only 4 of 5 can ever be covered
    with pytest.raises(ValueError, match="target_coverage"):
        sel.fit_threshold(dev, 0)


# ---- voting and strategies over a scripted model


def test_vote_plurality_and_its_tie_rule():
    assert vote(["B", "A", "A", "B", None, "C"]) == ("B", {"B": 2, "A": 2, "C": 1})  # tie: B was sampled first
    assert vote([None, "C", "A", "A"]) == ("A", {"C": 1, "A": 2})
    assert vote([None, None]) == (None, {})


class Scripted:
    """A LanguageModel whose answers are given: ``samples`` per generate call, in order; ``scores`` per option."""

    name = "scripted"

    def __init__(self, samples=(), scores=None, fail_on: str | None = None):
        self.samples, self.scores, self.fail_on = list(samples), scores or {}, fail_on
        self.prompts: list[str] = []

    def generate(self, prompts, *, max_tokens, temperature=0.0, n=1, stop=(), seed=None):
        self.prompts += prompts
        if self.fail_on and any(self.fail_on in p for p in prompts):
            raise BackendError("HTTP 500: boom (after 4 attempts)")
        out = self.samples.pop(0)
        assert len(out) == n
        return [out]

    def loglikelihood(self, requests):
        if self.fail_on and any(self.fail_on in c for c, _ in requests):
            raise BackendError("timed out (after 4 attempts)")
        return [(self.scores[cont[0]], 2) for _, cont in requests]


def test_self_consistency_agreement_counts_unparsed_samples():
    texts = ["The answer is (B).", "Answer: (A)", "no idea what", "Answer: (B)", "Answer: B"]
    lm = Scripted([texts])
    p = Strategy(lm, load_template("mc-cot-en"), StrategyConfig("self-consistency", samples=5)).predict(q("1", "B"))
    assert p.answer == "B" and p.votes == {"B": 3, "A": 1} and p.confidence == pytest.approx(3 / 5)
    assert p.confidence_kind == "vote_share" and p.outputs == texts and p.distribution == {"B": 0.6, "A": 0.2}


def test_ensemble_refinement_conditions_stage_two_on_stage_one():
    stage1 = ["Noah built it. Answer: (A)", "Moses. Answer: (B)"]
    stage2 = ["Answer: (A)", "Answer: (A)"]
    lm = Scripted([stage1, stage2])
    p = Strategy(lm, load_template("mc-cot-en"), StrategyConfig("ensemble", samples=2)).predict(q("1"))
    assert p.answer == "A" and p.votes == {"A": 2} and p.n_calls == 2 and len(p.prompts) == 2
    assert all(reasoning.strip() in p.prompts[1] for reasoning in stage1)


def test_loglik_distribution_abstain_option_and_threshold():
    template = load_template("mc-en", abstain=True)
    lm = Scripted(scores={"A": -1.0, "B": -2.0, "C": -3.0, "X": -0.5})
    p = Strategy(lm, template, StrategyConfig("loglik")).predict(q("1"))
    assert p.answer == ABSTAIN and set(p.distribution) == {"A", "B", "C", ABSTAIN}
    assert sum(p.distribution.values()) == pytest.approx(1) and p.confidence == max(p.distribution.values())
    lm = Scripted(scores={"A": -1.0, "B": -1.1, "C": -1.2})
    config = StrategyConfig("loglik", threshold=0.5)
    p = Strategy(lm, load_template("mc-en"), config).predict(q("1"))
    assert p.answer == ABSTAIN and p.distribution["A"] < 0.5  # most probable A, but not confident enough


def test_text_mode_scores_option_texts_after_the_cue_with_length_normalisation():
    lm = Scripted(scores={" ": 0.0})
    seen = []

    def loglikelihood(requests):
        seen.extend(requests)
        return [(-len(cont.strip()) * 1.0, 1) if cont != " Aaron" else (-3.0, 1) for _, cont in requests]

    lm.loglikelihood = loglikelihood
    config = StrategyConfig("loglik", option_mode="text", normalise="char")
    p = Strategy(lm, load_template("mc-en"), config).predict(q("1"))
    assert [c for _, c in seen] == [" Noah", " Moses", " Aaron"] and all(x.endswith("\nAnswer:") for x, _ in seen)
    # per character: Noah -4/4 = -1, Moses -5/5 = -1, Aaron -3/5 = -0.6 wins
    assert p.answer == "C" and p.distribution["A"] == pytest.approx(p.distribution["B"])


def test_loglik_with_a_cot_template_scores_the_letters_after_the_generated_reasoning():
    lm = Scripted([["Noah was told to build it [1]."]], scores={"A": -0.1, "B": -3.0, "C": -3.0})
    p = Strategy(lm, load_template("mc-cot-en"), StrategyConfig("loglik")).predict(q("1"))
    assert p.answer == "A" and p.n_calls == 2 and p.cited == ["1"] and not p.citations_ok  # no snippet [1] given
    assert p.prompts[1].endswith("Explanation: Noah was told to build it [1].\nAnswer: (")


def test_resume_keeps_the_answers_of_an_interrupted_run(tmp_path):
    questions = [q("1"), q("2"), q("3")]
    lm = Scripted(scores={"A": -1.0, "B": -2.0, "C": -3.0})
    config = EvalConfig(tmp_path, progress=False, resamples=100, settings={"data": "x"})
    first = run_eval(questions[:2], Strategy(lm, load_template("mc-en")), config)
    lm2 = Scripted(scores={"A": -1.0, "B": -2.0, "C": -3.0})
    strategy = Strategy(lm2, load_template("mc-en"))
    calls = []  # a resumed run asks only for the question it lacks
    strategy.predict = lambda question: calls.append(question.id) or Strategy.predict(strategy, question)
    resumed = run_eval(questions, strategy, dataclasses.replace(config, resume=True))
    assert calls == ["3"] and resumed["resumed"] == 2 and resumed["n"] == 3 and first["n"] == 2
    with pytest.raises(ValueError, match="other settings"):
        run_eval(questions, strategy, dataclasses.replace(config, resume=True, settings={"data": "y"}))


def test_a_backend_failure_marks_the_question_and_the_run_goes_on(tmp_path):
    lm = Scripted(scores={"A": -1.0, "B": -2.0, "C": -3.0}, fail_on="number 2?")
    questions = [q("1"), q("2"), q("3", "B", subject="exodus")]
    report = run_eval(
        questions, Strategy(lm, load_template("mc-en")), EvalConfig(tmp_path, progress=False, resamples=100)
    )
    assert report["failed"] == 1 and report["evaluated"] == 2
    assert report["failures"] == [{"id": "2", "line": 0, "reason": "timed out (after 4 attempts)"}]
    assert report["accuracy"]["value"] == 0.5 and report["per_subject"]["exodus"] == {"n": 1, "accuracy": 0.0}
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["failed"] is not None for r in rows] == [False, True, False] and rows[1]["correct"] is None


def test_a_dead_endpoint_fails_each_question_without_stopping_the_run(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    lm = OpenAIModel(f"127.0.0.1:{port}", retries=1, backoff=0.01)
    strategy = Strategy(lm, load_template("mc-en"), StrategyConfig("generate"))
    report = run_eval([q("1"), q("2")], strategy, EvalConfig(tmp_path, progress=False, resamples=100))
    assert report["failed"] == 2 and all("after 2 attempts" in f["reason"] for f in report["failures"])
    assert report["accuracy"]["value"] is None and (tmp_path / "risk_coverage.png").is_file()


def test_open_questions_report_exact_match_and_token_f1():
    questions = [
        Question("o1", "Who built the ark?", reference="Noah"),
        Question("o2", "Who led Israel out of Egypt?", reference="Moses the prophet"),
    ]
    preds = [Prediction("o1", "Noah", 1.0, "none"), Prediction("o2", "the prophet Aaron", 1.0, "none")]
    report = build_report(questions, preds, resamples=10)
    # o2: "the" and "prophet" in common, of 3 predicted and 3 reference words: precision = recall = F1 = 2/3
    assert report["open"] == {"n": 2, "exact_match": 0.5, "token_f1": pytest.approx((1 + 2 / 3) / 2, abs=1e-6)}


# ---- the command on the bundled model


def test_prompt_eval_end_to_end_on_the_bundled_model(tmp_path, capsys):
    exemplars = tmp_path / "exemplars.jsonl"
    exemplars.write_text(
        json.dumps(
            {
                "id": "ex1",
                "question": "Which organ pumps blood?",
                "options": {"A": "Heart", "B": "Skin"},
                "answer": "A",
                "explanation": "The heart pumps blood.",
            }
        )
        + "\n"  # fmt: skip
    )
    knowledge = tmp_path / "knowledge.jsonl"
    knowledge.write_text(json.dumps({"id": "d1", "text": "Scurvy comes from a lack of vitamin C.", "citation": "B 1"}))
    out = tmp_path / "loglik"
    argv = ["prompt-eval", "--data", str(MEDQA), "--out", str(out), "--shots", "1", "--exemplars", str(exemplars)]
    argv += ["--knowledge", str(knowledge), "--snippets", "1", "--abstain", "--no-progress", "--resamples", "200"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 questions:" in printed and "4 malformed rows skipped" in printed and "accuracy" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 3 and len(report["skipped_rows"]) == 4  # the fixture's malformed rows, by line
    assert any("line 4" in r for r in report["skipped_rows"])
    assert report["evaluated"] == 3 and report["calls"] == 3 and report["config"]["shots"] == 1
    assert set(report["accuracy_at_coverage"]) == {"1.0", "0.8", "0.5"} and report["brier"] is not None
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "Which organ pumps blood?" in rows[0]["prompts"][0]
    assert "[1] Scurvy comes from a lack of vitamin C. (B 1)" in rows[1]["prompts"][0]
    assert all(set(r["distribution"]) >= {"A", "B", ABSTAIN} for r in rows)
    assert sum(r["correct"] for r in rows) == round(report["accuracy"]["value"] * 3)
    for png in ("risk_coverage.png", "reliability.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    sc = tmp_path / "sc"
    argv = ["prompt-eval", "--data", str(MEDQA), "--out", str(sc), "--method", "self-consistency", "--samples", "3"]
    assert main([*argv, "--max-tokens", "4", "--limit", "2", "--no-progress", "--resamples", "50"]) == 0
    rows = [json.loads(line) for line in (sc / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["outputs"]) == 3 and r["confidence_kind"] == "vote_share" for r in rows)
    for r in rows:
        assert r["confidence"] == (max(r["votes"].values()) / 3 if r["votes"] else 0.0)
    report = json.loads((sc / "report.json").read_text())
    unparsed = sum(r["answer"] is None for r in rows)
    assert report["unparsed"] == unparsed and np.isclose(report["abstention_rate"], unparsed / 2)


def test_a_template_field_a_question_lacks_is_named_before_the_model_loads(tmp_path, capsys):
    template = tmp_path / "t.yaml"
    template.write_text(
        "name: spec\nlanguage: en\nkind: multiple_choice\ncot: false\ninstruction: 'About {specialty}.'\n"
    )
    argv = ["prompt-eval", "--data", str(MEDQA), "--out", str(tmp_path / "o"), "--template", str(template)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "field {specialty}" in err and "medqa-1" in err and not (tmp_path / "o" / "report.json").exists()
