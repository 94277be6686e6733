"""The ChatGLM tokenizers on vocabularies built here with the released special-token layouts (tests/helpers/
chatglm_vocab.py): special ids where the hub tokenizers put them, ChatGLM-6B's whitespace preprocessing, round trips
of Chinese, English, whitespace runs, tabs, newlines and emoji, and the errors a broken folder gives."""

import json
from pathlib import Path

import pytest

from glmkit.chatglm.tokenizers import load_chatglm_tokenizer, save_chatglm_tokenizer
from tests.helpers.chatglm_vocab import build_chatglm2_tokenizer, build_chatglm6b_tokenizer, build_glm4_tokenizer

TEXTS = [
    "你好",
    "晚上睡不着应该怎么办？",
    "hello world, the quick brown fox",
    "def main():\n    print('hello world')\t# greeting",
    "a  b   c" + " " * 85 + "d",
    "tabs\t\tand\nnew\n\nlines\n",
    "emoji 👋🙂 and 你好👋！",
    " leading and trailing ",
    "混合 mixed 文本 text",
]


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatglm6b")
    return folder, build_chatglm6b_tokenizer(folder)


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatglm2")
    return folder, build_chatglm2_tokenizer(folder)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatglm3")
    return folder, build_chatglm2_tokenizer(folder, chatglm3=True)


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glm4")
    return folder, build_glm4_tokenizer(folder)


@pytest.mark.parametrize("name", ["v1", "v2", "v3", "glm4"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(request, name, text):
    tok = load_chatglm_tokenizer(request.getfixturevalue(name)[0])
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.build_inputs(ids), skip_special_tokens=True) == text


def test_chatglm6b_special_ids_and_whitespace_pieces(v1):
    folder, n = v1
    tok = load_chatglm_tokenizer(folder)
    s = tok.specials
    # the released file: [MASK] 130000 [gMASK] 130001 [sMASK] 130002 <sop> 130004 <eop> 130005, <pad> 3
    assert (tok.family, s.mask, s.gmask, s.smask, s.sop, s.eop, s.eos, s.pad) == (
        "chatglm6b", n, n + 1, n + 2, n + 4, n + 5, n + 5, 3,
    )  # fmt: skip
    assert s.stops == (n + 5,) and s.roles == {}
    tab, blank = n + 8, lambda k: n + 9 + k - 2  # <|tab|> 130008, <|blank_2|> 130009 ... <|blank_80|> 130087
    assert tok.encode("a\nb").count(4) == 1  # <n> = 4
    assert tab in tok.encode("a\tb")
    assert blank(4) in tok.encode("x    y")
    ids = tok.encode("x" + " " * 85 + "y")  # longest run first: 80 then 5
    assert [i for i in ids if i >= blank(2)] == [blank(80), blank(5)]
    assert tok.encode("你好")[0] == 5  # the dummy prefix "▁" (id 5), as the hub's [5, 74874, ...]
    assert tok.build_inputs(tok.encode("你好"))[-2:] == [n + 1, n + 4]  # text [gMASK] <sop>
    byte_of = {b: n + 88 + b for b in range(256)}  # <0xNN> = 130088 + NN
    assert [byte_of[b] for b in "👋".encode()] == [i for i in tok.encode("👋") if i >= n + 88]
    assert tok.vocab_size == n + 88 + 256


def test_chatglm6b_blank_tokens_in_text_are_ids(v1):
    folder, n = v1
    tok = load_chatglm_tokenizer(folder)
    ids = tok.encode("北京是[MASK]的首都")
    assert n in ids and tok.decode(ids) == "北京是[MASK]的首都"
    assert tok.decode(ids, skip_special_tokens=True) == "北京是的首都"
    assert n not in tok.encode("北京是[MASK]的首都", allow_special=False)


def test_chatglm6b_num_image_tokens_shifts_every_id(v1, tmp_path):
    folder, n = v1
    shifted = tmp_path / "march"
    shifted.mkdir()
    (shifted / "ice_text.model").write_bytes((folder / "ice_text.model").read_bytes())
    (shifted / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 20000}))
    base, tok = load_chatglm_tokenizer(folder), load_chatglm_tokenizer(shifted)
    assert tok.specials.gmask == base.specials.gmask + 20000
    assert tok.encode("你好\n  x") == [i + 20000 for i in base.encode("你好\n  x")]
    assert tok.decode(tok.encode("你好\n  x")) == "你好\n  x"


def test_chatglm2_and_3_special_ids(v2, v3):
    (f2, n2), (f3, n3) = v2, v3
    t2, t3 = load_chatglm_tokenizer(f2), load_chatglm_tokenizer(f3)
    assert (t2.family, t3.family) == ("chatglm2", "chatglm3")
    for tok, n in ((t2, n2), (t3, n3)):
        s = tok.specials  # [MASK] 64789 [gMASK] 64790 [sMASK] 64791 sop 64792 eop 64793; eos </s> 2, pad <unk> 0
        assert (s.mask, s.gmask, s.smask, s.sop, s.eop, s.eos, s.pad) == (n, n + 1, n + 2, n + 3, n + 4, 2, 0)
        assert tok.encode("\n")[-1] == 13  # byte fallback <0x0A> = 3 + 10
        assert tok.build_inputs(tok.encode("你好"))[:2] == [n + 1, n + 3]  # [gMASK] sop text
    assert t2.specials.roles == {} and t2.specials.stops == (2,) and t2.vocab_size == n2 + 5
    roles = {"system": n3 + 5, "user": n3 + 6, "assistant": n3 + 7, "observation": n3 + 8}  # 64794..64797
    assert t3.specials.roles == roles and t3.specials.stops == (2, n3 + 6, n3 + 8)
    # a role string in text stays text unless asked for: a chat message cannot forge a turn
    assert n3 + 6 not in t3.encode("<|user|>") and t3.encode("<|user|>", allow_special=True) == [n3 + 6]
    assert t3.decode([n3 + 7, *t3.encode("hi")]) == "<|assistant|>hi"
    assert t3.decode([n3 + 7, *t3.encode("hi")], skip_special_tokens=True) == "hi"
    assert load_chatglm_tokenizer(f2, family="chatglm3").specials.roles == roles  # same file, family given


def test_glm4_special_ids(glm4):
    folder, n = glm4
    tok = load_chatglm_tokenizer(folder)
    s = tok.specials  # <|endoftext|> 151329 [MASK] 151330 [gMASK] 151331 [sMASK] 151332 <sop> 151333 <eop> 151334
    assert (tok.family, s.eos, s.mask, s.gmask, s.smask, s.sop, s.eop) == ("glm4", n, n + 1, n + 2, n + 3, n + 4, n + 5)
    assert s.roles == {"system": n + 6, "user": n + 7, "assistant": n + 8, "observation": n + 9}
    assert s.stops == (n, n + 7, n + 9) and tok.vocab_size == n + 14
    assert len(tok.encode("你好")) == 1 and tok.encode("\n") == [10]  # merged pair; a byte is its own rank
    assert tok.encode("<|user|>") != [n + 7] and tok.encode("<|user|>", allow_special=True) == [n + 7]
    assert tok.decode([n + 2, n + 4, *tok.encode("hi")]) == "[gMASK]<sop>hi"


@pytest.mark.parametrize(
    ("name", "layout"), [("v1", "chatglm6b"), ("v2", "chatglm2"), ("v3", "chatglm2"), ("glm4", "chatglm2")]
)
def test_prompt_layout_of_each_family(request, name, layout):
    from glmkit.prompts import layout as prompt_layout

    tok = load_chatglm_tokenizer(request.getfixturevalue(name)[0])
    assert tok.prompt_family == layout
    body = tok.encode("你好")
    # the prompt layout the generation code uses agrees with the tokenizer's own build_inputs
    built = prompt_layout(tok.specials, tok.prompt_family).model_input(tok.build_inputs(body))
    expected = [*body, tok.specials.gmask] if name == "v1" else tok.build_inputs(body)  # 6B: the engine feeds <sop>
    assert built == expected


def test_decode_rejects_unassigned_ids_and_assigned_filters_them(v2):
    tok = load_chatglm_tokenizer(v2[0])
    with pytest.raises(ValueError, match=f"id {tok.vocab_size} is not assigned"):
        tok.decode([tok.vocab_size])
    assert tok.assigned([5, tok.vocab_size, 6]) == [5, 6]


@pytest.mark.parametrize("name", ["v1", "v3", "glm4"])
def test_save_keeps_the_hub_layout(request, name, tmp_path):
    tok = load_chatglm_tokenizer(request.getfixturevalue(name)[0])
    save_chatglm_tokenizer(tok, tmp_path)
    again = load_chatglm_tokenizer(tmp_path)
    assert again.family == tok.family and again.specials == tok.specials
    assert again.encode(TEXTS[3]) == tok.encode(TEXTS[3])


def test_missing_tokenizer_file_is_named(tmp_path, v2):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}))
    with pytest.raises(FileNotFoundError, match=r"ice_text\.model .*tokenizer\.model.*|names ChatGLMTokenizer"):
        load_chatglm_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_chatglm_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"ice_text\.model is missing"):
        load_chatglm_tokenizer(v2[0], family="chatglm6b")


def test_broken_files_give_errors_naming_them(tmp_path, v1, v2):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_chatglm_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("aGVsbG8= 0\nd29ybGQ= x\n")
    with pytest.raises(ValueError, match="line 2 is not 'base64-token rank'"):
        load_chatglm_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("aGVsbG8= 0\nd29ybGQ= 5\n")
    with pytest.raises(ValueError, match=r"ranks are not 0\.\.1"):
        load_chatglm_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="GLM-4 reads tiktoken ranks"):
        load_chatglm_tokenizer(v2[0], family="glm4")
    with pytest.raises(ValueError, match="unknown ChatGLM family 'chatglm5'"):
        load_chatglm_tokenizer(v2[0], family="chatglm5")
    no_specials = tmp_path / "v1"
    no_specials.mkdir()
    (no_specials / "ice_text.model").write_bytes((v2[0] / "tokenizer.model").read_bytes())
    with pytest.raises(ValueError, match=r"has no '\[MASK\]' piece"):
        load_chatglm_tokenizer(no_specials)


def test_added_tokens_that_disagree_with_the_layout_are_refused(tmp_path, v3):
    folder, n = v3
    for f in ("tokenizer.model",):
        (tmp_path / f).write_bytes((Path(folder) / f).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(n + 6)]["content"] = "<|assistant|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"puts '<\|assistant\|>' at {n + 6}, the chatglm3 layout at {n + 7}"):
        load_chatglm_tokenizer(tmp_path)
