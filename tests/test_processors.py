"""Logits processors on hand-made logits (docs/generation-semantics.md TV-5, TV-6, TV-7, TV-9) and bitwise against
transformers' own processor classes on random scores."""

import math

import pytest
import torch

from glmkit.generate.config import GenerationConfig
from glmkit.generate.processors import (
    MinLength,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    Typical,
    apply_processors,
    build_processors,
)

NEG = -math.inf
X = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
TIES = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
IDS = torch.zeros(1, 1, dtype=torch.long)


def kept(scores: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(scores[0].tolist()) if v != NEG]


def test_tv5_top_k_keeps_ties():
    assert kept(TopK(2)(IDS, X)) == [3, 4]
    assert kept(TopK(2)(IDS, TIES)) == [1, 2, 4]


@pytest.mark.parametrize(
    "p, expected", [(0.5, [4]), (0.6, [4]), (0.7, [3, 4]), (0.9, [2, 3, 4]), (0.95, [2, 3, 4]), (0.99, [0, 1, 2, 3, 4])]
)
def test_tv5_top_p(p, expected):
    assert kept(TopP(p)(IDS, X)) == expected


def test_tv5_top_p_on_ties_drops_one_tied_token():
    assert kept(TopP(0.5)(IDS, TIES)) == [2, 4]


def test_tv5_temperature_widens_the_nucleus():
    assert Temperature(0.5)(IDS, X).tolist() == [[2.0, 4.0, 6.0, 8.0, 10.0]]
    out = apply_processors([Temperature(2.0), TopP(0.9)], IDS, X)
    assert out.tolist() == [[NEG, 1.0, 1.5, 2.0, 2.5]]


def test_tv5_min_p_and_top_k_then_top_p():
    assert kept(MinP(0.2)(IDS, X)) == [3, 4]
    sixty = torch.arange(60, dtype=torch.float)[None] / 10
    assert len(kept(apply_processors([TopK(10), TopP(0.5)], IDS, sixty))) == 4


def test_tv5_repetition_penalty():
    s = torch.tensor([[2.0, -1.0, 0.5, 10.0, 9.5]])
    out = RepetitionPenalty(1.5)(torch.tensor([[0, 1, 1]]), s)
    torch.testing.assert_close(out, torch.tensor([[2 / 1.5, -1.5, 0.5, 10.0, 9.5]]))
    out = RepetitionPenalty(1.1)(torch.tensor([[3]]), s)
    torch.testing.assert_close(out, torch.tensor([[2.0, -1.0, 0.5, 10 / 1.1, 9.5]]))


@pytest.mark.parametrize(
    "n, ids, banned",
    [(2, [1, 2, 3, 1], [2]), (2, [4, 1, 2, 1], [2]), (3, [1, 2, 3, 1, 2], [3]), (1, [1, 2], [1, 2]), (3, [1, 2], [])],
)
def test_tv5_no_repeat_ngram(n, ids, banned):
    out = NoRepeatNGram(n)(torch.tensor([ids]), torch.zeros(1, 5))
    assert [i for i in range(5) if out[0, i] == NEG] == banned


def test_tv5_min_length_and_min_new_tokens():
    eos_banned = lambda proc, length: bool(proc(torch.ones(1, length, dtype=torch.long), X)[0, 1] == NEG)  # noqa: E731
    assert eos_banned(MinLength(4, [1]), 3) and not eos_banned(MinLength(4, [1]), 4)
    assert eos_banned(MinLength(2, [1], skip=3), 4) and not eos_banned(MinLength(2, [1], skip=3), 5)


def test_tv6_repetition_penalty_on_log_probs_for_beams():
    logits = torch.tensor([[0.0, -5.0, 10.0, 9.5, 0.0, 0.0]])
    ids = torch.tensor([[2]])
    assert int(RepetitionPenalty(1.1)(ids, logits).argmax()) == 3  # greedy: raw logits
    lp = RepetitionPenalty(1.1)(ids, torch.log_softmax(logits, -1))
    torch.testing.assert_close(
        lp, torch.tensor([[-10.4742, -15.4742, -0.5216, -0.9742, -10.4742, -10.4742]]), atol=1e-4, rtol=0
    )
    assert int(lp.argmax()) == 2


def test_tv7_repetition_penalty_skips_left_padding():
    ids = torch.tensor([[5, 5], [1, 5]])
    scores = torch.tensor([[0.0, 2.0, 1.9, 0, 0, 0]] * 2)
    out = RepetitionPenalty(1.2, ignore=torch.tensor([0, 1]))(ids, scores)
    assert out.argmax(-1).tolist() == [1, 1]


def test_tv9_default_top_k_is_50_when_sampling():
    sixty = torch.arange(60, dtype=torch.float)[None]
    procs = build_processors(GenerationConfig(do_sample=True), [1], 1)
    assert len(kept(apply_processors(procs, IDS, sixty))) == 50
    for k in (0, None):
        procs = build_processors(GenerationConfig(do_sample=True, top_k=k), [1], 1)
        assert len(kept(apply_processors(procs, IDS, sixty))) == 60


def test_processors_order_and_beam_min_keep():
    cfg = GenerationConfig(
        do_sample=True,
        num_beams=2,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        min_p=0.1,
        typical_p=0.9,
        repetition_penalty=1.2,
        no_repeat_ngram_size=2,
        min_new_tokens=1,
    )
    procs = build_processors(cfg, [1, 2], 3)
    names = [type(p).__name__ for p in procs]
    assert names == [
        "RepetitionPenalty",
        "NoRepeatNGram",
        "MinLength",
        "Temperature",
        "TopK",
        "TopP",
        "MinP",
        "Typical",
    ]
    assert procs[5].min_keep == 3  # two stop ids + 1
    assert build_processors(GenerationConfig(), [1], 3) == []  # greedy without penalties: raw argmax


def test_bitwise_equal_to_transformers_processors():
    tp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 97, generator=g) * 3
    ids = torch.randint(0, 97, (4, 12), generator=g)
    ids[:, -3:] = ids[:, 2:5]  # repeated n-grams
    pairs = [
        (
            RepetitionPenalty(1.3, torch.tensor([0, 2, 0, 5])),
            tp.RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=torch.tensor([0, 2, 0, 5])),
        ),
        (NoRepeatNGram(3), tp.NoRepeatNGramLogitsProcessor(3)),
        (MinLength(3, [5, 7], skip=10), tp.MinNewTokensLengthLogitsProcessor(10, 3, torch.tensor([5, 7]))),
        (MinLength(13, [5]), tp.MinLengthLogitsProcessor(13, torch.tensor([5]))),
        (Temperature(0.7), tp.TemperatureLogitsWarper(0.7)),
        (TopK(7, 2), tp.TopKLogitsWarper(7, min_tokens_to_keep=2)),
        (TopP(0.8, 2), tp.TopPLogitsWarper(0.8, min_tokens_to_keep=2)),
        (MinP(0.05), tp.MinPLogitsWarper(0.05)),
        (Typical(0.7), tp.TypicalLogitsWarper(0.7)),
    ]
    for ours, theirs in pairs:
        assert torch.equal(ours(ids, scores.clone()), theirs(ids, scores.clone())), type(ours).__name__
