"""Per-row predictions of every task kind, with the task's metrics computed from them (``glmkit evaluate``).

Each ``predict_*`` returns ``(metrics, rows)``: one row per example with ``where`` (its file and line or row),
``input``, ``prediction``, ``gold`` and ``scores``. Seq2seq outputs are *generated* (greedy or beam search through
``glmkit.generate``) and scored with ROUGE-1/2/L (Google's ``rouge-score`` package, F-measure, no stemming), exact
match and token F1 after SQuAD's answer normalisation.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..masks import find_blanks
from .classify import ChoiceItem, ClassificationTask, ClassItem, MultipleChoiceTask
from .cloze import ClozeFeatures, ClozeTask, predict
from .lm import LMTask, LMWindow
from .registry import HeldOutCloze, Seq2SeqGeneration
from .seq2seq import Seq2SeqItem, Seq2SeqTask
from .tasks import BLANK, ClozeExample, normalize_answer, token_f1

Rows = list[dict[str, Any]]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measures of ``predictions`` against ``golds`` (``rouge_score.rouge_scorer``)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    totals = Counter()
    for p, g in zip(predictions, golds, strict=True):
        for k, v in scorer.score(g, p).items():
            totals[k] += v.fmeasure
    return {k: totals[k] / max(len(golds), 1) for k in ROUGE_TYPES}


def example_text(example: ClozeExample) -> str:
    parts = [*example.parts_a, *example.parts_b]
    return "".join("[MASK]" if p is BLANK else getattr(p, "text", p) for p in parts)


def predict_cloze(
    task: ClozeTask,
    model: torch.nn.Module,
    items: Sequence[ClozeFeatures],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], Rows]:
    labels = list(task.verbalizer) if task.verbalizer is not None else None
    rows, predictions, losses = [], [], []
    for scores, greedy, item in predict(model, items, task.length_penalty, batch_size):
        best = max(range(len(scores)), key=scores.__getitem__)
        choice = int(greedy[0]) if task.decide == "greedy" else best
        predictions.append(choice)
        if item.label >= 0:
            losses.append(float(-torch.log_softmax(torch.tensor(scores), 0)[item.label]))
        ex = item.example

        def name(i: int, ex: ClozeExample = ex) -> Any:
            return labels[i] if labels is not None else ex.candidates[i].strip()

        rows.append(
            {
                "where": ex.where,
                "input": example_text(ex),
                "prediction": name(choice) if task.decide == "argmax" else bool(choice),  # greedy: "is the fill"
                "gold": None if ex.label is None else name(ex.label),
                "scores": {str(name(i)): s for i, s in enumerate(scores)},
            }
        )
        if progress is not None:
            progress(1)
    metrics = task.metric([it.example for it in items], predictions)
    return {"loss": sum(losses) / max(len(losses), 1), **metrics}, rows


def _choice_rows(items: Sequence[ClassItem | ChoiceItem], probs: torch.Tensor, names) -> Rows:
    """One row per item: its prediction, gold answer and the score of each answer, ``names(item)`` naming them."""
    rows = []
    for it, p in zip(items, probs, strict=True):
        answers = [str(a) for a in names(it)]
        rows.append({
            "where": it.where,
            "input": it.text,
            "prediction": names(it)[int(p.argmax())],
            "gold": names(it)[it.label] if it.label >= 0 else None,
            "scores": {a: float(v) for a, v in zip(answers, p, strict=True)},
        })  # fmt: skip
    return rows


def predict_classification(
    task: ClassificationTask, model: torch.nn.Module, items: Sequence[ClassItem], batch_size: int = 16
) -> tuple[dict[str, float], Rows]:
    probs = task.probabilities(model, items, batch_size)
    return task.metrics(items, probs), _choice_rows(items, probs, lambda it: task.labels)


def predict_multiple_choice(
    task: MultipleChoiceTask, model: torch.nn.Module, items: Sequence[ChoiceItem], batch_size: int = 16
) -> tuple[dict[str, float], Rows]:
    probs = task.probabilities(model, items, batch_size)
    return task.metrics(items, probs), _choice_rows(items, probs, lambda it: it.choices)


def predict_lm(
    task: LMTask, model: torch.nn.Module, items: Sequence[LMWindow], batch_size: int = 16
) -> tuple[dict[str, float], Rows]:
    """One row per text: its tokens, loss and perplexity; the metrics over every token of every text."""
    per_doc: dict[int, list[float]] = {}
    first: dict[int, LMWindow] = {}
    for item, nll in zip(items, task.token_nll(model, items, batch_size), strict=True):
        per_doc.setdefault(item.doc, []).extend(nll)
        first.setdefault(item.doc, item)
    rows = []
    for doc, nll in per_doc.items():
        loss = sum(nll) / len(nll)
        text = first[doc].text
        rows.append(
            {
                "where": first[doc].where,
                "input": text if len(text) <= 200 else text[:200] + "...",
                "prediction": None,
                "gold": None,
                "scores": {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": len(nll)},
            }
        )
    all_nll = [x for nll in per_doc.values() for x in nll]
    loss = sum(all_nll) / max(len(all_nll), 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(len(all_nll))}, rows


def predict_seq2seq(
    task: Seq2SeqTask,
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[Seq2SeqItem],
    generation: Seq2SeqGeneration,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], Rows]:
    """Teacher-forced loss and token accuracy (``Seq2SeqTask.evaluate``), then each source's generated target
    against the gold one."""
    from ..generate import generate
    from ..prompts import layout, model_family

    metrics = task.evaluate(model, items, batch_size)
    special = tokenizer.special
    blanks = layout(special, model_family(model)).blank_ids()
    rows, preds, golds = [], [], []
    for item in items:
        s = item.sample
        prompt = s.tokens[: s.sep]
        blank = find_blanks(prompt, blanks)[0]
        gold_ids = [t for t, m in zip(s.targets[s.sep :], s.loss_mask[s.sep :], strict=True) if m][:-1]  # no <eop>
        out = generate(
            model,
            [prompt],
            special_tokens=special,
            tokenizer=tokenizer,
            num_beams=generation.num_beams,
            max_new_tokens=generation.max_new_tokens,
            length_penalty=generation.length_penalty,
            kernels=False,
        )
        span = [t for t in out.new_tokens[0] if t not in (special.eop, special.eos)]
        pred, gold = tokenizer.decode(span).strip(), tokenizer.decode(gold_ids).strip()
        preds.append(pred)
        golds.append(gold)
        source = tokenizer.decode(prompt[:blank] + prompt[blank + 1 :], skip_special_tokens=True).strip()
        rows.append({"where": item.where, "input": source, "prediction": pred, "gold": gold, "scores": {}})
        if progress is not None:
            progress(1)
    per_row = [rouge([p], [g]) for p, g in zip(preds, golds, strict=True)]
    for row, r, p, g in zip(rows, per_row, preds, golds, strict=True):
        row["scores"] = {**r, "em": float(normalize_answer(p) == normalize_answer(g)), "f1": token_f1(p, g)}
    n = max(len(rows), 1)
    for key in (*ROUGE_TYPES, "em", "f1"):
        metrics[key] = sum(row["scores"][key] for row in rows) / n
    return metrics, rows


def predict_heldout_cloze(
    task: HeldOutCloze,
    model: torch.nn.Module,
    tokenizer: Any,
    data: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], Rows]:
    """``glmkit eval-cloze``'s evaluation (``glmkit.cloze.evaluate_cloze``'s metrics) with a row per item."""
    from ..cloze import (
        WordFiller,
        build_cloze_items,
        choice_scores,
        first_word,
        shard_texts,
        unigram_word,
        word_counts,
    )

    counts = word_counts(shard_texts(data, "train", tokenizer))
    items = build_cloze_items(
        shard_texts(data, "val", tokenizer), task.items, task.seed, counts=counts, n_choices=task.n_choices
    )
    fill, baseline = WordFiller(model, tokenizer, task.max_new_tokens), unigram_word(counts)
    rows, open_right, choice_right, base_right = [], 0, 0, 0
    for item in items:
        word = first_word(fill(item.text))
        scores = choice_scores(model, tokenizer, item)
        chosen = item.choices[max(range(len(scores)), key=scores.__getitem__)]
        open_right += word == item.answer.lower()
        choice_right += chosen == item.answer
        base_right += max(item.choices, key=lambda w: counts[w]) == item.answer
        rows.append(
            {
                "where": f"{data} val",
                "input": item.text,
                "prediction": {"open": word, "choice": chosen},
                "gold": item.answer,
                "scores": dict(zip(item.choices, scores, strict=True)),
            }
        )
        if progress is not None:
            progress(1)
    n = max(len(items), 1)
    return {
        "items": float(len(items)),
        "open_accuracy": open_right / n,
        "open_baseline": sum(item.answer.lower() == baseline for item in items) / n,
        "choice_accuracy": choice_right / n,
        "choice_baseline": base_right / n,
    }, rows
