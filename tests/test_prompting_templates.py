"""Prompt templates (glmkit.prompting.templates): the built-ins render the Med-PaLM layouts byte for byte, a field
the question lacks is named, the abstain rule adds its option, answers are read back out of model text (with the
pitfalls: letters inside words, a model that runs on into the next question), and citations are checked."""

from dataclasses import replace

import pytest

from glmkit.prompting.templates import (
    TemplateError,
    builtin_templates,
    check_citations,
    load_template,
)
from glmkit.prompting.types import ABSTAIN, Exemplar, Question, Snippet

Q = Question("q1", "Who begat Salah?", {"A": "Arphaxad", "B": "Eber", "C": "Peleg", "D": "Reu"}, answer="A")
EX = Exemplar(
    Question("e1", "Who begat Enos?", {"A": "Seth", "B": "Adam", "C": "Cain", "D": "Noah"}, answer="A"),
    "Seth lived and begat Enos [1].",
)
OPEN_Q = Question("o1", "Who begat Salah?", reference="Arphaxad")
OPEN_EX = Exemplar(Question("o2", "Who begat Enos?", reference="Seth [1]."))
SN = Snippet("1", "And Arphaxad lived five and thirty years, and begat Salah:", "Genesis 11:12")

GOLDEN = {
    "mc-en": """\
The following are multiple choice questions (with answers) about medical knowledge.
Knowledge (cite by number):
[1] And Arphaxad lived five and thirty years, and begat Salah: (Genesis 11:12)
Question: Who begat Enos?
(A) Seth (B) Adam (C) Cain (D) Noah
Answer: (A)
Question: Who begat Salah?
(A) Arphaxad (B) Eber (C) Peleg (D) Reu
Answer: (""",
    "mc-cot-en": """\
The following are multiple choice questions about medical knowledge. Solve them step by step, starting by \
summarizing the available information, and give a single option as the final answer.
Knowledge (cite by number):
[1] And Arphaxad lived five and thirty years, and begat Salah: (Genesis 11:12)
Question: Who begat Enos?
(A) Seth (B) Adam (C) Cain (D) Noah
Explanation: Seth lived and begat Enos [1].
Answer: (A)
Question: Who begat Salah?
(A) Arphaxad (B) Eber (C) Peleg (D) Reu
Explanation:""",
    "mc-zh": """\
以下是关于医学知识的单项选择题（附答案）。
基于以下资料回答问题（按编号引用）：
[1] And Arphaxad lived five and thirty years, and begat Salah:（Genesis 11:12）
问题：Who begat Enos?
(A) Seth (B) Adam (C) Cain (D) Noah
答案：(A)
问题：Who begat Salah?
(A) Arphaxad (B) Eber (C) Peleg (D) Reu
答案：(""",
    "mc-cot-zh": """\
以下是关于医学知识的单项选择题。请逐步推理，先总结已知信息，最后给出唯一的选项作为答案。
基于以下资料回答问题（按编号引用）：
[1] And Arphaxad lived five and thirty years, and begat Salah:（Genesis 11:12）
问题：Who begat Enos?
(A) Seth (B) Adam (C) Cain (D) Noah
解析：Seth lived and begat Enos [1].
答案：(A)
问题：Who begat Salah?
(A) Arphaxad (B) Eber (C) Peleg (D) Reu
解析：""",
    "open-en": """\
Answer the question about medical knowledge accurately and completely, citing the knowledge you use by its \
number, e.g. [1]. Note any risks or limits of the answer.
If the evidence is not enough, say "I am not sure".
Knowledge:
[1] And Arphaxad lived five and thirty years, and begat Salah: (Genesis 11:12)
Question: Who begat Enos?
Answer: Seth [1].
Question: Who begat Salah?
Answer:""",
    "open-zh": """\
请准确、完整地回答以下关于医学知识的问题，并按编号引用所用资料，如 [1]。请注明可能的风险或局限。
如果证据不足，请回答“不确定”。
基于以下资料：
[1] And Arphaxad lived five and thirty years, and begat Salah:（Genesis 11:12）
问题：Who begat Enos?
回答：Seth [1].
问题：Who begat Salah?
回答：""",
}


def test_builtins_are_the_golden_set():
    assert builtin_templates() == sorted(GOLDEN)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_builtin_renders_golden(name):
    t = load_template(name)
    if t.kind == "open":
        assert t.render(OPEN_Q, [OPEN_EX], [SN]) == GOLDEN[name]
    else:
        assert t.render(Q, [EX], [SN]) == GOLDEN[name]


def test_zero_shot_without_knowledge_and_continuation():
    t = load_template("mc-en")
    prompt = t.render(Q)
    assert prompt == (
        "The following are multiple choice questions (with answers) about medical knowledge.\n"
        "Question: Who begat Salah?\n(A) Arphaxad (B) Eber (C) Peleg (D) Reu\nAnswer: ("
    )
    # an exemplar's answer is the test prompt's end plus the scored continuation, byte for byte
    assert t.answer_cue + t.continuation_for("B") == "Answer: (B)"
    assert load_template("mc-zh").continuation_for("C") == "C)"
    assert load_template("mc-cot-en").answer_cue == "Answer: ("


def test_field_defaults_and_question_fields():
    t = load_template("mc-en").with_defaults(domain="the King James Bible")
    assert t.render(Q).startswith("The following are multiple choice questions (with answers) about the King James")
    custom = replace(t, instruction="Questions on {subject} ({qtype}):")
    q = replace(Q, subject="Genesis", qtype="begat")
    assert custom.render(q).startswith("Questions on Genesis (begat):\n")
    assert replace(t, instruction="{book}").render(replace(Q, meta={"book": "Ge"})).startswith("Ge\n")


def test_missing_field_is_named_with_template_and_question():
    t = replace(load_template("mc-en"), instruction="Questions on {subject}.")
    with pytest.raises(TemplateError, match=r"'mc-en'.*\{subject\}.*instruction.*'q1'"):
        t.render(Q)
    with pytest.raises(TemplateError, match=r"\{explanation\}.*exemplar 'e1'"):
        load_template("mc-cot-en").render(Q, [Exemplar(EX.question)])
    with pytest.raises(TemplateError, match="no options"):
        load_template("mc-en").render(OPEN_Q)
    with pytest.raises(TemplateError, match="reference answer"):
        load_template("open-en").render(OPEN_Q, [Exemplar(Question("o3", "Who?"))])


def test_yaml_file_template_and_bad_files(tmp_path):
    good = tmp_path / "kjv.yaml"
    good.write_text(
        'name: kjv\nlanguage: en\nkind: multiple_choice\ncot: false\ninstruction: "Bible questions on {subject}."\n'
        'question: "Q: {question}"\nanswer: "A: ({answer})"\noption_sep: "\\n"\n'
    )
    t = load_template(str(good))
    assert t.abstain is None and t.abstain_rule is None
    assert t.render(replace(Q, subject="Genesis")) == (
        "Bible questions on Genesis.\nQ: Who begat Salah?\n(A) Arphaxad\n(B) Eber\n(C) Peleg\n(D) Reu\nA: ("
    )
    with pytest.raises(TemplateError, match=r"'kjv'.*\{subject\}"):
        t.render(Q)
    for body, message in [
        ("name: x\nlanguage: en\nkind: multiple_choice\nanswer: 'Answer:'\n", "exactly once"),
        ("name: x\nlanguage: en\nkind: quiz\n", "kind must be one of"),
        ("name: x\nlanguage: en\nkind: open\nquestoin: 'Q'\n", "unknown keys"),
        ("name: x\nlanguage: en\nkind: open\noption: '{letter} {body}'\n", "body"),
        ("name: x\nlanguage: en\nkind: open\nquestion: '{question'\n", "malformed"),
        ("name: x\nlanguage: en\nkind: open\nquestion: '{}'\n", "without positions"),
        ("- a list\n", "mapping"),
    ]:
        good.write_text(body)
        with pytest.raises(TemplateError, match=message):
            load_template(str(good))
    with pytest.raises(TemplateError, match="mc-en"):
        load_template("no-such-template")
    with pytest.raises(TemplateError, match="does not exist"):
        load_template(str(tmp_path / "missing.yaml"))


def test_abstain_rule_adds_option_and_instruction():
    t = load_template("mc-en", abstain=True)
    assert t.abstain is not None and t.abstain.letter == "X"
    prompt = t.render(Q)
    assert "\nIf the knowledge is not enough to answer, answer (X) I am not sure.\n" in prompt
    assert "(D) Reu (X) I am not sure\nAnswer: (" in prompt
    assert "(X)" not in load_template("mc-en").render(Q)
    zh = load_template("mc-zh").with_abstain()
    assert "(D) Reu (X) 不确定\n答案：(" in zh.render(Q)
    # a false-premise exemplar answers with the abstain letter
    false_premise = Exemplar(Question("e2", "Who begat Adam?", {"A": "Seth", "B": "Cain"}, answer=ABSTAIN))
    assert "(A) Seth (B) Cain (X) I am not sure\nAnswer: (X)\n" in t.render(Q, [false_premise])
    with pytest.raises(TemplateError, match="e2"):
        load_template("mc-en").render(Q, [false_premise])


def test_refinement_lists_reasonings_then_the_answer_start():
    t = load_template("mc-cot-en")
    prompt = t.render_refinement(Q, ["Arphaxad begat Salah [1].", "Eber came after."], [EX], [SN])
    assert prompt.startswith(t.render(Q, [EX], [SN]).split("\n", 1)[0] + "\nWe provide several student reasonings")
    assert prompt.endswith(
        "(A) Arphaxad (B) Eber (C) Peleg (D) Reu\nStudents' reasonings:\n1 reasoning: Arphaxad begat Salah [1].\n"
        "2 reasoning: Eber came after.\nExplanation:"
    )
    assert load_template("mc-zh").render_refinement(Q, ["甲"]).endswith("学生的推理：\n推理1：甲\n答案：(")
    with pytest.raises(TemplateError, match="no refinement"):
        load_template("open-en").render_refinement(OPEN_Q, ["x"])
    with pytest.raises(TemplateError, match="at least one"):
        t.render_refinement(Q, [])


def test_render_keeps_whitespace_tight():
    q = replace(Q, question="  Who   begat\n\n  Salah?  ", options={"A": " Arphaxad ", "B": "Eber\t"})
    assert load_template("mc-en").render(q).endswith("Question: Who begat\nSalah?\n(A) Arphaxad (B) Eber\nAnswer: (")


EXTRACT = [
    # direct prompts end in "(": the continuation is the letter and its bracket
    ("mc-en", "A)", "A"),
    ("mc-en", "C", "C"),
    ("mc-en", " B) Eber\nQuestion: Who begat Peleg?\n(A) Eber\nAnswer: (A)", "B"),  # ran on into a new question
    ("mc-en", "A man begat him", None),  # "A" the article, not an answer
    # Med-PaLM 2 CoT, Flan and lm-eval styles
    ("mc-cot-en", "Arphaxad begat Salah [1].\nAnswer: (A)", "A"),
    ("mc-cot-en", "So the answer is (C).", "C"),
    ("mc-cot-en", "the answer is D because Reu", "D"),
    ("mc-cot-en", "**Answer:** (B)", "B"),
    ("mc-cot-en", "Final answer: D", "D"),
    ("mc-cot-en", "First I thought Answer: (B), but no.\nAnswer: (C)", "C"),  # the last answer line counts
    ("mc-cot-en", "Answer: Adam", None),  # a letter inside a word never counts
    ("mc-cot-en", "Answer: (E)", None),  # not an option
    ("mc-cot-en", "(D)\n", "D"),  # a bare option line
    ("mc-cot-en", "C. Peleg", "C"),
    ("mc-cot-en", "(A) Arphaxad (B) Eber", None),  # an echo of the options is not an answer
    ("mc-cot-en", "I think it was Eber.", "B"),  # option text, whole words
    ("mc-cot-en", "Arphaxad or Eber", None),  # two options named
    ("mc-cot-en", "I am not sure.", ABSTAIN),
    ("mc-cot-en", "I don't know, but the answer is (B)", "B"),  # an answer given beats a hedge
    ("mc-cot-en", "no idea", None),
    ("mc-cot-en", "", None),
    # Chinese
    ("mc-zh", "答案：C", "C"),
    ("mc-zh", "答案是 (C)", "C"),
    ("mc-zh", "答案为B。", "B"),
    ("mc-zh", "答案：（D）", "D"),
    ("mc-cot-zh", "资料[1]说亚法撒生沙拉。\n答案：(A)", "A"),
    ("mc-cot-zh", "不确定", ABSTAIN),
]


@pytest.mark.parametrize("name,text,expected", EXTRACT)
def test_extract(name, text, expected):
    assert load_template(name).extract(text, Q)[0] == expected


def test_extract_abstain_letter_and_citations():
    t = load_template("mc-cot-en", abstain=True)
    assert t.extract("Nothing says who [1]. Answer: (X)", Q) == (ABSTAIN, ["1"])
    assert load_template("mc-en", abstain=True).extract("X)", Q) == (ABSTAIN, [])
    # without the rule, X is no option
    assert load_template("mc-en").extract("X)", Q) == (None, [])
    assert t.extract("[2] and 【3】 say so, and [2] again. Answer: (A)", Q) == ("A", ["2", "3"])


def test_extract_open():
    t = load_template("open-en")
    assert t.extract(" Arphaxad [1], as Genesis says.\nQuestion: next?", OPEN_Q) == (
        "Arphaxad [1], as Genesis says.",
        ["1"],
    )
    assert t.extract("I am not sure [2].", OPEN_Q) == (ABSTAIN, ["2"])
    assert t.extract("  \n", OPEN_Q) == (None, [])
    assert load_template("open-zh").extract("不确定。", OPEN_Q)[0] == ABSTAIN
    assert load_template("open-zh").extract("亚法撒 [1]", OPEN_Q) == ("亚法撒 [1]", ["1"])


def test_check_citations():
    snippets = [SN, Snippet("2", "And Salah lived thirty years, and begat Eber:", "Genesis 11:14")]
    assert check_citations([], snippets)
    assert check_citations(["1", "2"], snippets)
    assert not check_citations(["3"], snippets)
    assert not check_citations(["1"], [])
