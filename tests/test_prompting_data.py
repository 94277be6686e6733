"""Question files, knowledge retrieval and exemplar selection (glmkit.prompting.datasets / knowledge / exemplars):
each benchmark layout loads, malformed rows are named by file and line and skipped or raised, BM25 finds the verse
that answers a proof question, and the similarity selector never shows the question itself and keeps to strata."""

import importlib.util
import json
import warnings
from itertools import islice
from pathlib import Path

import pytest

from glmkit.data.prepare import held_out_draws
from glmkit.finetune.data import DataError
from glmkit.prompting.datasets import load_questions
from glmkit.prompting.exemplars import FixedSelector, SimilaritySelector
from glmkit.prompting.knowledge import BM25Knowledge, Document, tokenize
from glmkit.prompting.types import ABSTAIN, Exemplar, Question

FIX = Path(__file__).parent / "fixtures" / "prompting"
ROOT = Path(__file__).parent.parent


def _load(path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qs = load_questions(path, **kw)
    return qs, [str(w.message) for w in caught]


def test_medqa_layout_and_bad_rows_named_by_line():
    qs, warned = _load(FIX / "medqa.jsonl")
    assert qs.layout == "medqa" and [q.line for q in qs] == [1, 2, 7]
    first = qs[0]
    assert first.options["B"] == "Lumbar puncture" and first.answer == "B" and first.meta["meta_info"] == "step1"
    assert first.id == "medqa-1" and first.source == "medqa"
    assert len(qs[1].options) == 5 and qs[1].answer == "C"
    assert qs.skipped == 4 and len(warned) == 4
    medqa = str(FIX / "medqa.jsonl")
    for line, problem in [
        (3, "answer_idx 'E'"),
        (4, "not valid JSON"),
        (5, "not the text of option A"),
        (8, "'question'"),
    ]:
        assert any(e.startswith(f"{medqa} line {line}: ") and problem in e for e in qs.errors), (line, qs.errors)
    with pytest.raises(DataError, match=r"medqa.jsonl line 3: answer_idx 'E'"):
        load_questions(FIX / "medqa.jsonl", on_error="raise")


def test_medmcqa_cop_base_both_releases():
    hf, _ = _load(FIX / "medmcqa_hf.jsonl")  # 0-based (a 0 is present)
    assert hf.layout == "medmcqa" and [q.id for q in hf] == ["m1", "m2", "m4"]
    assert [q.answer for q in hf] == ["A", "B", "D"]
    assert hf[0].subject == "Pathology" and hf[0].qtype == "single" and hf[0].meta["exp"].startswith("Very high")
    assert "opd" in hf.errors[0] and "line 3" in hf.errors[0] and "line 5" in hf.errors[1] and "cop 7" in hf.errors[1]
    gh, _ = _load(FIX / "medmcqa_github.jsonl")  # 1-based (a 4 is present): the same first question, answer a
    assert [q.answer for q in gh] == ["A", "D"]
    forced, _ = _load(FIX / "medmcqa_github.jsonl", cop_base=0)
    assert [q.answer for q in forced] == ["B"] and "cop 4" in forced.errors[0]


def test_medmcqa_ambiguous_and_contradictory_cop(tmp_path):
    row = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2}
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps(row) + "\n")
    qs, warned = _load(f)
    assert qs[0].answer == "C" and any("only ever 1..3" in w for w in warned)
    assert load_questions(f, cop_base=1)[0].answer == "B"
    f.write_text(json.dumps({**row, "cop": 0}) + "\n" + json.dumps({**row, "cop": 4}) + "\n")
    with pytest.raises(DataError, match="both 0 and 4"):
        load_questions(f)
    f.write_text(json.dumps({**row, "cop": "c"}) + "\n")
    assert load_questions(f, layout="medmcqa")[0].answer == "C"


def test_pubmedqa_original_json_and_jsonl():
    qs, _ = _load(FIX / "pubmedqa.json")
    assert qs.layout == "pubmedqa" and [q.id for q in qs] == ["10000001", "10000002"]
    q = qs[0]
    assert q.options == {"A": "yes", "B": "no", "C": "maybe"} and q.answer == "A"
    assert q.context.startswith("Hypertension is common") and "thirty minutes" in q.context
    assert qs[1].answer == "B"
    assert any("entry '10000003'" in e and "perhaps" in e for e in qs.errors)
    assert any("entry '10000004'" in e and "JSON object" in e for e in qs.errors)
    lines, _ = _load(FIX / "pubmedqa.jsonl")
    assert [(q.id, q.answer) for q in lines] == [("20000001", "C"), ("20000002", "A")]
    assert lines[0].context == "Wearable trackers report nightly sleep. Duration changed little over eight weeks."
    assert "line 3" in lines.errors[0] and "'context'" in lines.errors[0]


def test_glmkit_layout_chinese_open_and_abstain():
    qs, _ = _load(FIX / "glmkit_zh.jsonl")
    assert qs.layout == "glmkit" and [q.id for q in qs] == ["z1", "z2", "z4"]
    assert qs[0].options["A"] == "亚法撒" and qs[0].subject == "创世记" and qs[0].qtype == "begat"
    assert not qs[1].is_multiple_choice and qs[1].reference.startswith("饮食控制")
    assert qs[2].answer == ABSTAIN and qs[2].meta["book"] == "创世记"
    assert "line 3" in qs.errors[0] and "'X'" in qs.errors[0]
    assert "line 5" in qs.errors[1] and "'z1'" in qs.errors[1]
    with pytest.raises(DataError, match="glmkit_zh.jsonl line 3"):
        load_questions(FIX / "glmkit_zh.jsonl", on_error="raise")


def test_bad_arguments_and_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_questions(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="layout"):
        load_questions(FIX / "medqa.jsonl", layout="mmlu")
    with pytest.raises(ValueError, match="on_error"):
        load_questions(FIX / "medqa.jsonl", on_error="ignore")
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="cannot tell the layout"):
        load_questions(odd)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no questions"):
        load_questions(tmp_path / "empty.jsonl")


def test_tokenize_english_words_and_chinese_bigrams():
    assert tokenize("And Arphaxad begat SALAH: the LORD's") == ["and", "arphaxad", "begat", "salah", "the", "lord's"]
    assert tokenize("亚法撒生沙拉。挪") == ["亚法", "法撒", "撒生", "生沙", "沙拉", "挪"]


def test_bm25_ranks_matching_documents_deterministically():
    docs = [
        Document("ge1:1", "In the beginning God created the heaven and the earth.", "Genesis 1:1"),
        Document("ge11:12", "And Arphaxad lived five and thirty years, and begat Salah:", "Genesis 11:12"),
        Document("ge11:14", "And Salah lived thirty years, and begat Eber:", "Genesis 11:14"),
        Document("zh", "亚法撒活到三十五岁，生了沙拉。"),
    ]
    kb = BM25Knowledge(docs)
    got = kb.retrieve("Whom did Arphaxad beget? Salah", 3)
    assert [s.citation for s in got] == ["Genesis 11:12", "Genesis 11:14"]  # only documents sharing a word
    assert [s.id for s in got] == ["1", "2"] and got[0].score > got[1].score > 0
    assert kb.retrieve("亚法撒生了谁", 2)[0].citation == "zh"  # no citation: the document's id
    assert kb.retrieve("zebra", 3) == [] and kb.retrieve("Salah", 0) == []
    with pytest.raises(ValueError, match="twice"):
        BM25Knowledge(docs + docs[:1])


def test_bm25_from_jsonl_names_bad_rows(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"id": "a", "text": "Adam begat Seth", "citation": "Genesis 5:3"}\n{"id": 3}\n')
    with pytest.raises(DataError, match="line 2"):
        BM25Knowledge.from_jsonl(f)
    with pytest.warns(UserWarning, match="line 2"):
        kb = BM25Knowledge.from_jsonl(f, on_error="skip")
    assert kb.retrieve("Seth", 1)[0].citation == "Genesis 5:3"


def _ex(qid, text, subject, qtype):
    return Exemplar(Question(qid, text, {"A": "Seth", "B": "Eber"}, answer="A", subject=subject, qtype=qtype))


POOL = [
    _ex("p1", "Who begat Salah?", "Genesis", "begat"),
    _ex("p2", "Who begat Eber in the land?", "Genesis", "begat"),
    _ex("p3", "Who said unto Moses, Go down?", "Exodus", "said"),
    _ex("p4", "Who begat Enos?", "Luke", "begat"),
    _ex("p5", "Who went down into Egypt?", "Genesis", "went"),
    _ex("p6", "Who said unto Abram, Get thee out?", "Genesis", "said"),
]


def test_similarity_selector_excludes_self_and_near_duplicates():
    sel = SimilaritySelector(POOL)
    q = Question("p1", "Who begat Salah?", {"A": "Arphaxad"}, subject="Genesis", qtype="begat")
    assert "p1" not in [e.question.id for e in sel.select(q, 6)]
    twin = Question("new", "who begat  Salah", {"A": "Arphaxad"}, subject="Genesis", qtype="begat")
    assert "p1" not in [e.question.id for e in sel.select(twin, 6)]  # same words under another id
    assert len(sel.select(twin, 6)) == 5 and sel.select(twin, 0) == []
    assert [e.question.id for e in FixedSelector(POOL).select(twin, 2)] == ["p2", "p3"]


def test_similarity_selector_stratifies():
    q = Question("t", "Who begat Salah and Eber?", {"A": "Arphaxad"}, subject="Genesis", qtype="begat")
    ids = [e.question.id for e in SimilaritySelector(POOL).select(q, 6)]
    # same subject and type, then same type, then same subject (by similarity), then the rest
    assert ids[:3] == ["p1", "p2", "p4"] and set(ids[3:5]) == {"p5", "p6"} and ids[5] == "p3"
    unstratified = [e.question.id for e in SimilaritySelector(POOL, stratify=False).select(q, 3)]
    assert unstratified[0] == "p1" and set(unstratified[1:]) == {"p2", "p4"}
    said = Question(
        "s", "Who said unto Abram, Get thee out of thy country?", {"A": "x"}, subject="Exodus", qtype="said"
    )
    assert [e.question.id for e in SimilaritySelector(POOL).select(said, 1)] == ["p3"]  # its own stratum beats p6
    rr = [e.question.id for e in SimilaritySelector(POOL, round_robin=True).select(q, 4)]
    # one from each stratum before any stratum gives a second
    assert rr[0] == "p1" and len({(e.question.subject, e.question.qtype) for e in POOL if e.question.id in rr}) == 4
    assert rr == [e.question.id for e in SimilaritySelector(POOL, round_robin=True).select(q, 4)]


def _script():
    spec = importlib.util.spec_from_file_location("make_kjv_questions", ROOT / "scripts" / "make_kjv_questions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SLICE = [  # (book, chapter, reference, text) as the `bible` program gives them, King James Version
    ("Ge", "Ge4", "Ge 4:9", "And the LORD said unto Cain, Where is Abel thy brother? And he said, I know not: Am I "
     "my brother's keeper?"),
    ("Ge", "Ge4", "Ge 4:25", "And Adam knew his wife again; and she bare a son, and called his name Seth: For God, "
     "said she, hath appointed me another seed instead of Abel, whom Cain slew."),
    ("Ge", "Ge11", "Ge 11:10", "These are the generations of Shem: Shem was an hundred years old, and begat Arphaxad "
     "two years after the flood:"),
    ("Ge", "Ge11", "Ge 11:12", "And Arphaxad lived five and thirty years, and begat Salah:"),
    ("Ge", "Ge11", "Ge 11:14", "And Salah lived thirty years, and begat Eber:"),
    ("Ge", "Ge11", "Ge 11:16", "And Eber lived four and thirty years, and begat Peleg:"),
    ("Ge", "Ge11", "Ge 11:26", "And Terah lived seventy years, and begat Abram, Nahor, and Haran."),
    ("Ge", "Ge12", "Ge 12:10", "And there was a famine in the land: and Abram went down into Egypt to sojourn there; "
     "for the famine was grievous in the land."),
    ("Ge", "Ge12", "Ge 12:4", "So Abram departed, as the LORD had spoken unto him; and Lot went with him: and Abram "
     "was seventy and five years old when he departed out of Haran."),
]  # fmt: skip


def test_kjv_questions_from_a_slice_are_answered_by_their_retrieved_verse():
    script = _script()
    questions = script.build(SLICE, seed=0)
    by_text = {q["question"]: q for q in questions}
    salah = by_text["Who begat Salah?"]
    assert salah["options"][salah["answer"]] == "Arphaxad" and salah["qtype"] == "begat"
    assert salah["subject"] == "Genesis" and salah["meta"]["verse"] == "Genesis 11:12"
    assert by_text["Whom did Eber beget?"]["options"][by_text["Whom did Eber beget?"]["answer"]] == "Peleg"
    cain = by_text["Who said unto Cain, Where is Abel thy brother?"]
    assert cain["options"][cain["answer"]] == "the LORD"
    egypt = by_text["Who went down into Egypt to sojourn there?"]
    assert egypt["options"][egypt["answer"]] == "Abram" and egypt["qtype"] == "went"
    kb = BM25Knowledge(Document(**d) for d in script.verse_documents(SLICE))
    for q in questions:
        assert sorted(q["options"]) == list("ABCD") and len(set(q["options"].values())) == 4
        answer = q["options"][q["answer"]]
        verse = q["meta"]["verse_text"]
        assert answer in verse  # the answer is in its verse; no distractor is
        assert not [o for k, o in q["options"].items() if k != q["answer"] and o in verse], q
        assert q["meta"]["verse"] in [s.citation for s in kb.retrieve(q["question"], 3)], q["question"]
    assert questions == script.build(SLICE, seed=0)  # deterministic
    assert any(a["options"] != b["options"] for a, b in zip(questions, script.build(SLICE, seed=1), strict=True))
    # the rows load as glmkit's question layout
    assert script.explanation(salah).startswith('Genesis 11:12 says: "And Arphaxad lived')


def test_kjv_questions_come_from_held_out_chapters_only():
    script = _script()
    rows = [("Ge", f"Ge{c}", f"Ge {c}:1", "And Adam begat Seth.") for c in range(1, 51)]
    held = script.held_out_chapters(rows)
    expected = {f"Ge{c}" for c, h in zip(range(1, 51), islice(held_out_draws(0.05, 0), 50), strict=True) if h}
    assert held == expected and 0 < len(held) < 50
