"""The SuperGLUE tasks of the GLM paper on small fixtures in the SuperGLUE jsonl formats (tests/fixtures/superglue,
written for these tests): what each line becomes under GLM's patterns, the metrics, and bad rows."""

from pathlib import Path

import pytest

from glmkit.finetune import BLANK, DataError, Shortenable, evaluate_task, load_split, read_jsonl, superglue_task
from glmkit.finetune.superglue import TASKS
from glmkit.finetune.tasks import accuracy_and_f1_macro, multirc_metrics, record_metrics

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"


def _text(example) -> str:
    parts = [*example.parts_a, *example.parts_b]
    return "".join("[MASK]" if p is BLANK else p.text if isinstance(p, Shortenable) else p for p in parts)


def _examples(name, split="val", **kw):
    return superglue_task(name, **kw).examples(load_split(FIXTURES / name, split), train=split == "train")


def test_rte_and_cb_patterns_and_verbalizers():
    (ex, _) = _examples("rte", pattern_id=0)
    assert (
        _text(ex)
        == '"The company has offices in Bergen" ?[MASK], "The company moved its offices from Oslo to Bergen in 2010."'
    )
    assert ex.candidates == (" Yes", " No") and ex.label == 0
    (_, ex) = _examples("cb")  # the script's default pattern 3
    assert (
        _text(ex)
        == "the meeting was moved?[MASK]. He thought the meeting might be moved. No one had told him anything yet."
    )
    assert ex.candidates == (" Yes", " No", " Maybe") and ex.label == 2
    assert _examples("cb", pattern_id=4)[0].candidates == (" true", " false", " neither")


def test_boolq_wic_patterns():
    (ex, _) = _examples("boolq")  # pattern 4: the question first, then the passage
    assert _text(ex).startswith("Based on the following passage  is the museum open all year?[MASK]. Lenmark Museum")
    assert ex.candidates == (" No", " Yes") and ex.label == 1
    assert _examples("boolq", pattern_id=1)[1].candidates == (" false", " true")
    (ex,) = _examples("wic")
    assert _text(ex) == (
        "The children play outside. Dogs play in the yard. Does play have the same meaning in both sentences?[MASK]"
    )
    assert _examples("wic", pattern_id=2)[0].candidates == ("2", "b")


def test_copa_trains_on_mirrored_rows_and_answers_in_lower_case_without_final_punctuation():
    train = _examples("copa", "train")
    assert len(train) == 6
    first, mirror = train[0], train[1]
    assert first.candidates == (" it shattered on the floor", " it filled with water") and first.label == 0
    assert mirror.candidates == first.candidates[::-1] and mirror.label == 1
    assert (
        _text(first) == '"it shattered on the floor" or "it filled with water"? The glass fell off the table, so[MASK].'
    )
    assert _text(train[2]).endswith(" The girl put on her coat because[MASK].")


def test_multirc_gives_one_row_per_answer_option():
    val = _examples("multirc")
    assert [e.label for e in val] == [1, 0, 1, 1, 0] and len({e.meta["question"] for e in val}) == 2
    assert _text(val[0]) == (
        "The bakery on Mill Lane opens at six. On weekdays it sells rye bread and on Saturdays it also sells cakes. "
        "Question: When does the bakery open? Is it At six?[MASK]."
    )


def test_wsc_trains_on_positive_rows_and_marks_the_pronoun():
    train = _examples("wsc", "train")
    assert len(train) == 2 and all(e.label == 0 for e in train)
    val = _examples("wsc")
    assert [e.meta["truth"] for e in val] == [True, False] and val[1].label is None
    assert _text(val[0]) == (
        "Lucy thanked Jane because *she* had helped with the move . Question: In the passage above, what does the "
        "pronoun '*she*' refer to? Answer:[MASK]."
    )
    assert val[0].candidates == (" Jane",)


def test_record_candidates_are_the_passage_entities():
    (ex,) = _examples("record")
    assert ex.candidates == (" Kalla", " Norby", " Osel", " Tamm") and ex.label == 0
    assert ex.meta["answers"] == ("Kalla",)
    assert "@highlight" not in _text(ex) and "- Work starts in May" in _text(ex)
    assert _text(ex).endswith(" Engineers from[MASK] will lead the work.")
    (train,) = _examples("record", "train")
    assert train.candidates[0] == " Olav Lind" and train.label == 0 and set(train.candidates) == {
        " Olav Lind", " Riga", " Vessby"
    }  # fmt: skip


def test_metrics_by_hand():
    from glmkit.finetune.tasks import ClozeExample

    def ex(label, **meta):
        return ClozeExample((), (), ("a", "b", "c"), label, meta=meta)

    cb = accuracy_and_f1_macro([ex(0), ex(1), ex(2), ex(0)], [0, 1, 1, 2])
    assert cb["accuracy"] == 0.5
    assert cb["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)  # F1 of classes 0, 1, 2
    mrc = multirc_metrics([ex(1, question=1), ex(0, question=1), ex(1, question=2)], [1, 0, 0])
    assert mrc == {"f1a": pytest.approx(2 / 3), "em": 0.5, "accuracy": pytest.approx(2 / 3)}
    rec = record_metrics([ClozeExample((), (), (" The Kalla", " Osel"), 0, meta={"answers": ("Kalla",)})], [0])
    assert rec == {"em": 1.0, "f1": 1.0}


@pytest.mark.parametrize("name", TASKS)
def test_every_task_evaluates_on_the_bundled_model(name):
    from glmkit.bundled import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()
    task = superglue_task(name)
    if task.verbalizer is not None and any(len(tok.encode(w)) > 1 for w in task.verbalizer.values()):
        with pytest.raises(ValueError, match="verbalizer word"):
            evaluate_task(model, tok, task, load_split(FIXTURES / name, "val"))
        task = superglue_task(name, multi_token=True)
    metrics = evaluate_task(model, tok, task, load_split(FIXTURES / name, "val"))
    assert set(metrics) == {"loss", *task.metric_names}
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "loss") and metrics["loss"] >= 0.0
    items = task.prepare(tok, load_split(FIXTURES / name, "train"), train=True)
    assert items and float(task.loss(model, task.collate(items)).detach()) >= 0.0


def test_a_bad_jsonl_row_is_named_then_rejected_or_skipped(tmp_path):
    good = (FIXTURES / "rte" / "val.jsonl").read_text().splitlines()
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join([good[0], "{not json", "[1, 2]", good[1]]) + "\n")
    with pytest.raises(DataError, match=r"val.jsonl line 2: not valid JSON"):
        read_jsonl(path)
    with pytest.warns(UserWarning) as caught:
        rows = read_jsonl(path, on_error="skip")
    assert [r.line for r in rows] == [1, 4]
    assert [str(w.message).split(": ", 1)[1].split(" line ")[1][:1] for w in caught] == ["2", "3"]


def test_a_row_missing_a_field_or_with_an_unknown_label_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"premise": "p.", "hypothesis": "h.", "label": "entailment", "idx": 0}\n'
        '{"premise": "p.", "label": "entailment", "idx": 1}\n'
        '{"premise": "p.", "hypothesis": "h.", "label": "maybe", "idx": 2}\n'
    )
    task, rows = superglue_task("rte"), read_jsonl(path)
    with pytest.raises(DataError, match=r"train.jsonl line 2: missing field 'hypothesis'"):
        task.examples(rows)
    with pytest.warns(UserWarning) as caught:
        assert len(task.examples(rows, on_error="skip")) == 1
    assert [str(w.message).split("train.jsonl ")[1] for w in caught] == [
        "line 2: missing field 'hypothesis'",
        "line 3: label 'maybe' is not in the verbalizer of task rte (labels: 'entailment', 'not_entailment')",
    ]
    with pytest.raises(DataError, match="line 1: label 'yes' is not an index"):
        superglue_task("copa").examples(
            [{"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": "yes"}]
        )


def test_unknown_task_and_pattern_are_named():
    with pytest.raises(ValueError, match="unknown SuperGLUE task 'mnli'"):
        superglue_task("mnli")
    with pytest.raises(ValueError, match="pattern_id: copa has patterns 0..1, got 5"):
        superglue_task("copa", pattern_id=5)
