import pytest
import torch

from glmkit import cloze
from glmkit.cloze import ClozeItem, build_cloze_items, evaluate_cloze, first_word, unigram_word, word_counts

TEXTS = [
    "and the king said unto the people go in peace and the people went",
    "in the beginning was the word and the word was with the king",
    "the land was quiet for forty years and the people rested there",
]


def test_items_blank_one_alphabetic_word_with_context():
    items = build_cloze_items(TEXTS, 20, seed=1)
    assert len(items) == 20
    for it in items:
        assert it.text.count("[MASK]") == 1 and it.answer.isalpha()
        i = it.text.split().index("[MASK]")
        assert i >= 1  # the blank always has left context
    assert build_cloze_items(TEXTS, 20, seed=1) == items
    with_choices = build_cloze_items(TEXTS, 20, seed=1, counts=word_counts(TEXTS), n_choices=4)
    for it in with_choices:
        assert it.answer in it.choices and len(set(it.choices)) == 4


def test_baseline_and_scoring(monkeypatch):
    counts = word_counts(TEXTS)
    assert unigram_word(counts) == "the"
    assert first_word("  Peace, and more") == "peace" and first_word("") == ""
    items = [
        ClozeItem("go in [MASK] and", "peace", ("peace", "the")),
        ClozeItem("[MASK] king", "the", ("king", "the")),
        ClozeItem("x [MASK]", "word", ("the", "word")),
    ]

    class Oracle:  # fills every blank with the right word, capitalised and with punctuation
        def __init__(self, model, tok, max_new_tokens):
            pass

        def __call__(self, text):
            return " " + next(i.answer for i in items if i.text == text).capitalize() + "."

    monkeypatch.setattr(cloze, "WordFiller", Oracle)
    # a scorer preferring the right candidate, by name
    monkeypatch.setattr(cloze, "choice_scores", lambda m, t, it: [float(c == it.answer) for c in it.choices])
    res = evaluate_cloze(torch.nn.Identity(), None, items, counts)
    assert res.open_accuracy == 1.0 and res.open_baseline == pytest.approx(1 / 3) and res.baseline_word == "the"
    assert res.choice_accuracy == 1.0 and res.choice_baseline == pytest.approx(1 / 3) and res.n_choices == 2


def test_no_usable_text():
    with pytest.raises(ValueError, match="no document"):
        build_cloze_items(["too short"], 5)
    assert cloze.first_word("...") == ""


def test_word_filler_returns_one_word_from_a_real_model(tmp_path):
    from glmkit.bundled import BUNDLED_MODEL, load_model_and_tokenizer

    if not (BUNDLED_MODEL / "config.json").exists():
        pytest.skip("no bundled model")
    model, tok = load_model_and_tokenizer()
    word = cloze.WordFiller(model, tok)("And God said, Let there be [MASK]: and there was light.")
    assert word.startswith(" ") and word[1:].isalpha()
    with pytest.raises(ValueError, match="exactly one blank"):
        cloze.WordFiller(model, tok)("no blank here")


def test_choice_scores_rank_by_span_likelihood():
    from glmkit.bundled import BUNDLED_MODEL, load_model_and_tokenizer

    if not (BUNDLED_MODEL / "config.json").exists():
        pytest.skip("no bundled model")
    model, tok = load_model_and_tokenizer()
    item = ClozeItem("And God said, Let there be [MASK]: and there was light.", "light", ("light", "zebra"))
    scores = cloze.choice_scores(model, tok, item)
    assert len(scores) == 2 and scores[0] > scores[1] and all(s < 0 for s in scores)
