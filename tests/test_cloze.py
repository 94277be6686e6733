import pytest

from glmkit import cloze
from glmkit.cloze import ClozeItem, build_cloze_items, evaluate_cloze, first_word, unigram_word

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


def test_baseline_and_scoring(monkeypatch):
    assert unigram_word(TEXTS) == "the"
    assert first_word("  Peace, and more") == "peace" and first_word("") == ""
    items = [ClozeItem("go in [MASK] and", "peace"), ClozeItem("[MASK] king", "the"), ClozeItem("x [MASK]", "word")]

    def fake_fill(model, tok, text, **kw):
        answer = next(i.answer for i in items if i.text == text)
        return type("R", (), {"spans": [" " + answer.capitalize() + "."]})()

    monkeypatch.setattr("glmkit.generate.fill_blanks", fake_fill)
    res = evaluate_cloze(None, None, items, TEXTS)  # the patched filler answers every blank correctly
    assert res.model_accuracy == 1.0 and res.baseline_accuracy == pytest.approx(1 / 3) and res.baseline_word == "the"


def test_no_usable_text():
    with pytest.raises(ValueError, match="no document"):
        build_cloze_items(["too short"], 5)
    assert cloze.first_word("...") == ""
