"""compare-decoding: the metrics on hand-made texts (values worked out by hand), the perplexity scoring layout
against the engine's own step logits, and the command end to end (table, markdown, JSON, PNG; seeded)."""

import json
import math

import pytest
import torch

from glmkit import KVCache
from glmkit.bundled import load_model_and_tokenizer
from glmkit.cli import main
from glmkit.generate import generate
from glmkit.generate.engine import GLMStepper, prefill
from glmkit.generate.metrics import bleu, distinct_n, perplexity, repetition_rate, self_bleu, span_nll
from tests.helpers.text_model import save_text_model


def test_distinct_n_and_repetition_rate():
    texts = ["a b a b".split(), "c".split()]
    assert distinct_n(texts, 1) == 3 / 5  # a, b, c among a b a b c
    assert distinct_n(texts, 2) == 2 / 3  # ab, ba among ab ba ab
    assert distinct_n([["a"]], 2) == 0.0
    assert repetition_rate(["a b c d a b c d".split()]) == 1 / 5  # abcd repeats; 5 four-grams
    assert repetition_rate(["a b c d e".split(), "x x x x x x".split()]) == 2 / 5  # (0 + 2) / (2 + 3)
    assert repetition_rate([["a", "b"]]) == 0.0


def test_bleu_and_self_bleu():
    a, b = "the king said unto them".split(), "go and see what the lord hath done".split()
    assert bleu(a, [a]) == pytest.approx(1.0) and bleu(a, [["x", "y"]]) == 0.0  # no common unigram
    # one common unigram ("the"): p1 = 1/5, p2..4 = 0.1/4, 0.1/3, 0.1/2 (method1); brevity exp(1 - 8/5)
    p = math.log(1 / 5) + math.log(0.1 / 4) + math.log(0.1 / 3) + math.log(0.1 / 2)
    assert bleu(a, [b]) == pytest.approx(math.exp(1 - 8 / 5) * math.exp(p / 4))
    assert self_bleu([a, a, a]) == pytest.approx(1.0)
    assert bleu(["x"], [b]) == 0.0
    # hyp "the king said" vs ref "the king said unto them": p1 = p2 = p3 = 1, p4 = 0.1 / 1 (method1),
    # brevity exp(1 - 5/3)
    assert bleu(a[:3], [a]) == pytest.approx(math.exp(1 - 5 / 3) * 0.1**0.25)
    # clipping: "the the the the" vs "the king": p1 = 1/4, p2..4 smoothed 0.1/3, 0.1/2, 0.1/1; brevity 1
    expected = math.exp((math.log(1 / 4) + math.log(0.1 / 3) + math.log(0.1 / 2) + math.log(0.1)) / 4)
    assert bleu(["the"] * 4, [["the", "king"]]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="texts"):
        self_bleu([a])
    assert perplexity([math.log(2)] * 3) == pytest.approx(2.0) and math.isnan(perplexity([]))


def test_span_nll_scores_what_the_engine_generated(tmp_path):
    model, tok = load_model_and_tokenizer(save_text_model(tmp_path / "m"))
    context = [tok.special.cls] + tok.encode("the king said") + [tok.special.gmask]
    span = generate(model, context, max_new_tokens=5, do_sample=True, seed=0, tokenizer=tok).new_tokens[0]
    cache = KVCache.for_model(model, 1, 16)
    with torch.no_grad():
        prefill(model, [context], cache)
        stepper = GLMStepper(model, cache, torch.tensor([4]), tok.special.sop)
        logits = [stepper.step(None)] + [stepper.step(torch.tensor([t])) for t in span[:-1]]
    expected = [-torch.log_softmax(x[0], -1)[t].item() for x, t in zip(logits, span, strict=True)]
    assert span_nll(model, context, span, tok.special.sop, 4) == pytest.approx(expected, abs=1e-4)


def test_command_writes_table_markdown_json_png_and_is_seeded(tmp_path, capsys):
    model = save_text_model(tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the king said\tunto them go\nwhat the lord\thath done in egypt\ngo and see\tthe land\n")
    argv = ["compare-decoding", "--model", str(model), "--prompts", str(prompts), "--max-new-tokens", "6"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert "top-p-0.95" in capsys.readouterr().out
    doc = json.loads((tmp_path / "a" / "compare-decoding.json").read_text())
    names = [r["name"] for r in doc["results"]]
    assert names == [
        "human",
        "greedy",
        "beam-4",
        "top-k-40",
        "top-p-0.9",
        "top-p-0.95",
        "temp-0.7",
        "temp-1.0",
        "temp-1.3",
    ]
    for r in doc["results"]:
        assert 0 <= r["distinct_1"] <= 1 and 0 <= r["self_bleu_4"] <= 1 and r["perplexity"] > 1
        assert (r["tokens_per_s"] is None) == (r["name"] == "human") and len(r["texts"]) == 3
    assert (tmp_path / "a" / "compare-decoding.png").stat().st_size > 10_000
    assert "| beam-4 |" in (tmp_path / "a" / "compare-decoding.md").read_text()
    assert main([*argv, "--out", str(tmp_path / "b"), "--seed", "3"]) == 0
    again = json.loads((tmp_path / "b" / "compare-decoding.json").read_text())
    metrics = ("distinct_1", "distinct_2", "self_bleu_4", "repetition_4", "mean_length", "perplexity", "texts")
    assert [[r[m] for m in metrics] for r in again["results"]] == [[r[m] for m in metrics] for r in doc["results"]]
    prompts.write_text("the king said\n")
    assert main([*argv, "--out", str(tmp_path / "c")]) == 2
    assert "at least two prompts" in capsys.readouterr().err
