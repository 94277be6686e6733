"""The task registry's metrics against independent computations: ROUGE (against a hand-written LCS / n-gram count),
exact match and token F1, macro-F1, perplexity of GLM's continuation layout (against a token-by-token decode over
the KV cache), sliding windows that score every token once; seq2seq and lm through ``glmkit evaluate``; the folded-in
held-out cloze evaluation equal to ``glmkit eval-cloze``."""

import json
import math
from collections import Counter

import pytest
import torch

from glmkit import GLM, GLMConfig
from glmkit.cli import main
from glmkit.finetune.lm import LMTask, windows
from glmkit.finetune.predict import predict_classification, rouge
from glmkit.finetune.registry import build_task
from glmkit.kv_cache import KVCache
from glmkit.tokenizer import WhitespaceTokenizer

WORDS = "a b c d e f g h the cat sat on mat dog ran".split()


def _model(seed=0, vocab=32, length=48):
    torch.manual_seed(seed)
    return GLM(GLMConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, max_sequence_length=length)).eval()


# ---- ROUGE, EM, F1 ---------------------------------------------------------------------------------------------


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _f(overlap, n_pred, n_gold):
    if not overlap:
        return 0.0
    p, r = overlap / n_pred, overlap / n_gold
    return 2 * p * r / (p + r)


def _rouge_by_hand(pred, gold):
    p, g = pred.lower().split(), gold.lower().split()
    grams = lambda t, n: Counter(zip(*(t[i:] for i in range(n)), strict=False))  # noqa: E731
    r1 = _f(sum((grams(p, 1) & grams(g, 1)).values()), len(p), len(g))
    r2 = _f(sum((grams(p, 2) & grams(g, 2)).values()), len(p) - 1, len(g) - 1)
    return {"rouge1": r1, "rouge2": r2, "rougeL": _f(_lcs(p, g), len(p), len(g))}


def test_rouge_is_the_f_measure_of_n_gram_and_lcs_overlap():
    pairs = [("the cat sat on the mat", "the cat is on the mat"), ("a b c d", "d c b a"), ("dog ran", "the dog ran")]
    by_hand = [_rouge_by_hand(p, g) for p, g in pairs]
    got = rouge([p for p, _ in pairs], [g for _, g in pairs])
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(sum(h[key] for h in by_hand) / len(pairs))
    assert by_hand[1]["rougeL"] == pytest.approx(0.25)  # one word of four in order: a check on the hand version


# ---- classification metrics ------------------------------------------------------------------------------------


def test_classification_accuracy_and_macro_f1_against_counting():
    task = build_task("classification", {"labels": ["x", "y", "z"]}, 48)
    tok = WhitespaceTokenizer(WORDS)
    rows = [
        {"text": t, "label": lab} for t, lab in zip("a b c d e f g h".split(), "x x y y z z x y".split(), strict=True)
    ]
    items = task.prepare(tok, rows, train=False)
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1],
                          [0.1, 0.1, 0.8], [0.1, 0.5, 0.4], [0.5, 0.4, 0.1], [0.3, 0.6, 0.1]])  # fmt: skip

    class Fixed(torch.nn.Module):  # a "model" whose head gives these probabilities, in row order
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, mask):
            return type("Out", (), {"logits": probs[: ids.shape[0]].log()})

    metrics, out = predict_classification(task, Fixed(), items, batch_size=len(items))
    golds, preds = [r["gold"] for r in out], [r["prediction"] for r in out]
    assert preds == ["x", "y", "y", "x", "z", "y", "x", "y"]
    assert metrics["accuracy"] == sum(p == g for p, g in zip(preds, golds, strict=True)) / 8 == 5 / 8
    f1s = []
    for c in "xyz":  # precision and recall per class, then their harmonic mean
        tp = sum(p == g == c for p, g in zip(preds, golds, strict=True))
        precision, recall = tp / max(preds.count(c), 1), tp / golds.count(c)
        f1s.append(2 * precision * recall / (precision + recall) if tp else 0.0)
    assert metrics["f1_macro"] == pytest.approx(sum(f1s) / 3)
    expected_loss = -sum(math.log(probs[i, "xyz".index(g)]) for i, g in enumerate(golds)) / 8
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)


# ---- language modelling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "max_length", "overlap"), [(5, 48, 32), (30, 12, 3), (30, 12, 0), (9, 11, 8)])
def test_windows_score_every_token_once_with_at_most_overlap_context(n, max_length, overlap):
    ids = list(range(100, 100 + n))
    spans = windows(ids, max_length, overlap)
    assert [t for _, scored in spans for t in scored] == ids
    for i, (context, scored) in enumerate(spans):
        assert len(context) + len(scored) <= max_length - 2
        assert len(context) == (0 if i == 0 else min(overlap, ids.index(scored[0])))
        assert context == ids[ids.index(scored[0]) - len(context) : ids.index(scored[0])]


@torch.no_grad()
def _nll_by_decoding(model, tok, context, scored):
    """Σ -log p of ``scored`` after ``[CLS] context [gMASK]``, decoded token by token over the KV cache."""
    sp = tok.special
    part_a = [sp.cls, *context, sp.gmask]
    cache = KVCache.for_model(model, 1, len(part_a) + len(scored) + 1)
    model(torch.tensor([part_a]), None, len(part_a), cache)
    total, feed = 0.0, sp.sop
    for k, target in enumerate(scored):
        pos = torch.tensor([[[len(part_a) - 1], [k + 1]]])
        logits = model(torch.tensor([[feed]]), pos, 0, cache)[0, -1].float()
        total -= float(torch.log_softmax(logits, -1)[target])
        feed = target
    return total


@pytest.mark.parametrize("overlap", [0, 4])
def test_perplexity_is_the_continuation_likelihood_of_every_token_window_by_window(overlap):
    model, tok = _model(3), WhitespaceTokenizer(WORDS)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(0, 60, 7))  # 9 tokens
    task = LMTask(max_length=8, overlap=overlap)
    items = task.prepare(tok, [{"text": text}], train=False)
    ids = tok.encode(text)
    expected = sum(_nll_by_decoding(model, tok, c, s) for c, s in windows(ids, 8, overlap))
    got = task.evaluate(model, items, batch_size=2)
    assert got["tokens"] == len(ids)
    assert got["loss"] == pytest.approx(expected / len(ids), rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(expected / len(ids)), rel=1e-4)


def test_lm_and_seq2seq_through_glmkit_evaluate(tmp_path):
    folder = tmp_path / "model"
    tok = WhitespaceTokenizer(WORDS)
    _model(1, length=64).save_pretrained(folder)
    tok.save_pretrained(folder)
    (tmp_path / "doc.txt").write_text(" ".join(WORDS * 5))
    out = tmp_path / "lm"
    args = ["evaluate", "--model", str(folder), "--task", "lm", "--data", str(tmp_path / "doc.txt"), "--out", str(out)]
    assert main([*args, "--option", "overlap=8"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    (row,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert metrics["tokens"] == row["scores"]["tokens"] == len(WORDS) * 5
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"])) and metrics["perplexity"] > 1

    rows = [{"source": "the cat sat on", "target": "the mat"}, {"source": "a b c", "target": "d"}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "s2s"
    assert main(["evaluate", "--model", str(folder), "--task", "seq2seq", "--data", str(tmp_path / "s.jsonl"),
                 "--out", str(out), "--option", "num_beams=2", "--option", "max_new_tokens=3",
                 "--no-progress"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["gold"] for p in preds] == ["the mat", "d"] and [p["input"] for p in preds] == [
        "the cat sat on",
        "a b c",
    ]
    for p in preds:
        assert len(p["prediction"].split()) <= 3
        assert p["scores"]["em"] == float(p["prediction"] == p["gold"])
        assert p["scores"]["rougeL"] == pytest.approx(_rouge_by_hand(p["prediction"], p["gold"])["rougeL"])
    for key in ("rouge1", "rouge2", "rougeL", "em", "f1"):
        assert metrics[key] == pytest.approx(sum(p["scores"][key] for p in preds) / 2)
    assert {"loss", "token_accuracy"} <= set(metrics)


# ---- held-out cloze (glmkit eval-cloze) ------------------------------------------------------------------------


def test_heldout_cloze_through_evaluate_equals_eval_cloze(tmp_path, capsys):
    from glmkit.bundled import BUNDLED_MODEL
    from glmkit.data.prepare import prepare_data

    verses = [
        "In the beginning God created the heaven and the earth and the earth was without form and void",
        "And God said Let there be light and there was light and God saw the light that it was good",
        "And the evening and the morning were the first day and God called the light Day",
        "Blessed is the man that walketh not in the counsel of the ungodly nor standeth in the way of sinners",
    ] * 6
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": v}) + "\n" for v in verses))
    prepare_data([corpus], tmp_path / "data", BUNDLED_MODEL, val_fraction=0.3)
    assert main(["eval-cloze", "--data", str(tmp_path / "data"), "--items", "4", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    out = tmp_path / "ev"
    args = ["evaluate", "--task", "heldout-cloze", "--data", str(tmp_path / "data"), "--option", "items=4"]
    assert main([*args, "--out", str(out)]) == 0
    got = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("items", "open_accuracy", "open_baseline", "choice_accuracy", "choice_baseline"):
        assert got[key] == pytest.approx(expected[key]), key
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("[MASK]" in r["input"] and r["gold"] in r["scores"] for r in rows)
