"""The ChatGLM chat templates against ids written out from the hub templates (chatglm-6b ``chat``, chatglm2-6b
``build_prompt``, chatglm3-6b ``build_chat_input``, glm-4 ``apply_chat_template``), and history trimming."""

import pytest

from glmkit.chatglm.chat import chat_prompt, served_chat_prompt
from glmkit.chatglm.tokenizers import load_chatglm_tokenizer
from tests.helpers.chatglm_vocab import build_chatglm2_tokenizer, build_chatglm6b_tokenizer, build_glm4_tokenizer

Q1, A1, Q2 = "你好", "你好👋！很高兴见到你，有什么可以帮助你的吗？", "晚上睡不着应该怎么办"
THREE = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    build_chatglm6b_tokenizer(root / "v1")
    build_chatglm2_tokenizer(root / "v2")
    build_chatglm2_tokenizer(root / "v3", chatglm3=True)
    build_glm4_tokenizer(root / "glm4")
    return {name: load_chatglm_tokenizer(root / name) for name in ("v1", "v2", "v3", "glm4")}


def test_chatglm6b_rounds(toks):
    tok = toks["v1"]
    g, sop = tok.specials.gmask, tok.specials.sop
    # a first question alone is sent as it is: "你好" -> [5, 74874, 130001, 130004] with the released vocabulary
    assert tok.apply_chat_template([{"role": "user", "content": Q1}]) == [*tok.encode(Q1), g, sop]
    text = f"[Round 0]\n问：{Q1}\n答：{A1}\n[Round 1]\n问：{Q2}\n答："
    ids = tok.apply_chat_template(THREE)
    assert ids == [*tok.encode(text), g, sop]
    assert ids.count(4) == 5  # every "\n" is the <n> piece


def test_chatglm2_rounds(toks):
    tok = toks["v2"]
    g, sop = tok.specials.gmask, tok.specials.sop
    # "[Round 1]\n\n问：你好\n\n答：" -> [64790, 64792, 790, 30951, ...] with the released vocabulary
    assert tok.apply_chat_template([{"role": "user", "content": Q1}]) == [
        g,
        sop,
        *tok.encode(f"[Round 1]\n\n问：{Q1}\n\n答："),
    ]
    text = f"[Round 1]\n\n问：{Q1}\n\n答：{A1}\n\n[Round 2]\n\n问：{Q2}\n\n答："
    assert tok.apply_chat_template(THREE) == [g, sop, *tok.encode(text)]


def test_chatglm3_role_tokens(toks):
    tok = toks["v3"]
    s, nl = tok.specials, tok.encode("\n")
    sysmsg = {"role": "system", "content": "You are ChatGLM3."}
    expected = [s.gmask, s.sop, s.roles["system"], *nl, *tok.encode("You are ChatGLM3.")]
    expected += [s.roles["user"], *nl, *tok.encode(Q1), s.roles["assistant"], *nl, *tok.encode(A1)]
    expected += [s.roles["user"], *nl, *tok.encode(Q2), s.roles["assistant"]]
    assert tok.apply_chat_template([sysmsg, *THREE]) == expected
    # [user: 你好] -> [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]: "\n" encodes as ▁ + <0x0A>
    assert nl[-1] == 13
    no_prompt = [s.gmask, s.sop, s.roles["user"], *nl, *tok.encode(Q1)]
    assert tok.apply_chat_template(THREE[:1], add_generation_prompt=False) == no_prompt
    assert chat_prompt(tok, THREE).stop_ids == (2, s.roles["user"], s.roles["observation"])


def test_glm4_role_tokens(toks):
    tok = toks["glm4"]
    n = tok.specials.eos  # <|endoftext|> is the first special: 151329 in the release
    hello = tok.encode(Q1)
    assert len(hello) == 1
    # [user: 你好] -> [151331, 151333, 151336, 198, 109377, 151337] ("\n" is 198 there, the byte 10 here)
    assert tok.apply_chat_template([{"role": "user", "content": Q1}]) == [n + 2, n + 4, n + 7, 10, *hello, n + 8]
    ids = tok.apply_chat_template(THREE)
    assert ids == [n + 2, n + 4, n + 7, 10, *hello, n + 8, 10, *tok.encode(A1), n + 7, 10, *tok.encode(Q2), n + 8]
    tool = [*THREE[:1], {"role": "tool", "content": "42"}]
    assert tok.apply_chat_template(tool)[-6:] == [*hello, n + 9, 10, *tok.encode("42"), n + 8]
    assert chat_prompt(tok, THREE).stop_ids == (n, n + 7, n + 9)


def test_content_parts_and_special_strings_stay_text(toks):
    tok = toks["glm4"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "<|assistant|>"}, {"type": "image_url"}]}]
    ids = tok.apply_chat_template(parts)
    assert ids.count(tok.specials.roles["assistant"]) == 1  # only the generation prompt's


@pytest.mark.parametrize("name", ["v1", "v2", "v3", "glm4"])
def test_long_history_loses_its_oldest_turns_with_a_notice(toks, name):
    tok = toks[name]
    history = []
    for k in range(12):
        history += [{"role": "user", "content": f"第{k}个问题：{Q2}"}, {"role": "assistant", "content": A1 * 2}]
    messages = [*history, {"role": "user", "content": Q2}]
    if name in ("v3", "glm4"):
        messages = [{"role": "system", "content": "Answer briefly."}, *messages]
    full = chat_prompt(tok, messages)
    assert full.notice is None and full.dropped_messages == 0
    budget = len(full.ids) // 3
    out = chat_prompt(tok, messages, max_length=budget)
    assert len(out.ids) <= budget and out.dropped_messages > 0 and out.cut_tokens == 0
    assert out.dropped_messages % 2 == 0  # whole turns
    assert "left out the oldest" in out.notice
    kept = (
        messages[:1] + messages[1 + out.dropped_messages :]
        if name in ("v3", "glm4")
        else messages[out.dropped_messages :]
    )
    assert out.ids == chat_prompt(tok, kept).ids  # exactly the template of what is kept (rounds renumbered)
    assert chat_prompt(tok, messages, max_length=len(full.ids)).ids == full.ids


@pytest.mark.parametrize("name", ["v1", "v2", "v3", "glm4"])
def test_a_question_longer_than_the_context_is_cut_not_a_crash(toks, name):
    tok = toks[name]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages.append({"role": "user", "content": (Q2 + " the quick brown fox ") * 40})
    out = chat_prompt(tok, messages, max_length=20)
    assert len(out.ids) == 20 and out.dropped_messages == 2 and out.cut_tokens > 0
    assert "cut its first" in out.notice
    s = tok.specials
    if name == "v1":
        assert out.ids[-2:] == [s.gmask, s.sop]
    else:
        assert out.ids[:2] == [s.gmask, s.sop]
    if name in ("v3", "glm4"):
        assert out.ids[-1] == s.roles["assistant"]


def test_round_templates_leave_the_system_message_out_with_a_notice(toks):
    tok = toks["v2"]
    with_system = [{"role": "system", "content": "Be brief."}, *THREE]
    out = chat_prompt(tok, with_system)
    assert out.ids == tok.apply_chat_template(THREE) and "no system role" in out.notice


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "non-empty list"),
        ([{"role": "wizard", "content": "x"}], r"messages\[0\]: unsupported role 'wizard'"),
        ([{"role": "user", "content": 5}], r"messages\[0\]: content must be a string"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "text must be a string"),
        (["hello"], r"messages\[0\]: expected an object"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternates user and assistant"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message is the assistant"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "no tool / observation role"),
    ],
)
def test_bad_messages_are_named(toks, messages, error):
    with pytest.raises(ValueError, match=error):
        chat_prompt(toks["v2"], messages)


def test_too_small_a_context_is_refused(toks):
    with pytest.raises(ValueError, match="at least 8 tokens"):
        chat_prompt(toks["glm4"], THREE, max_length=3)


def test_served_chat_prompt_fits_the_server_and_skips_other_tokenizers(toks):
    from glmkit.tokenizer import WhitespaceTokenizer

    tok = toks["glm4"]
    long = [*THREE[:2]] * 20 + [THREE[2]]
    out = served_chat_prompt(tok, long, max_prompt_tokens=4096, max_model_len=120, max_tokens=40)
    assert len(out.ids) <= 80 and out.dropped_messages > 0 and out.stop_ids == tok.specials.stops
    assert len(served_chat_prompt(tok, long, max_prompt_tokens=60, max_model_len=4096, max_tokens=40).ids) <= 60
    assert served_chat_prompt(WhitespaceTokenizer(), THREE, 100, 100, 10) is None
    with pytest.raises(ValueError, match="at least 8 tokens"):
        served_chat_prompt(tok, THREE, max_prompt_tokens=4096, max_model_len=40, max_tokens=40)
