"""``train_tokenizer`` / ``glmkit train-tokenizer``: stable special ids, streaming corpora, exact round trips."""

import json

import pytest

from glmkit.cli import main
from glmkit.tokenizer import BPE_SPECIAL_TOKENS, GLMTokenizer, load_tokenizer
from glmkit.train_tokenizer import train_tokenizer

LINES = [
    "the model fills in the blank with a span of text",
    "autoregressive blank infilling unifies understanding and generation",
    "general language model pretraining with blanks",
    "北京是中国的首都",
] * 25
EDGE = ["", " ", "\n\t ", "  two  spaces  ", "naïve café", "日本語", "emoji 😀👍🏽", "never seen: ẞ ⸘ 𝔘"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("\n".join(LINES[:50]) + "\n\n")
    sub = root / "more"
    sub.mkdir()
    (sub / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(LINES[50:])))
    (sub / "ignored.csv").write_text("not,part,of,the,corpus\n" * 50)
    return root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    return train_tokenizer([corpus / "a.txt", corpus / "more"], tmp_path_factory.mktemp("bpe"), vocab_size=400)


def test_specials_at_fixed_low_ids(trained):
    assert trained.kind == "bpe"
    sp = trained.special
    assert (sp.eos, sp.pad, sp.sop, sp.eop, sp.cls, sp.mask, sp.sep, sp.unk, sp.gmask, sp.smask) == (
        0, 0, 1, 2, 3, 4, 5, 6, 7, 8
    )  # fmt: skip
    assert trained.convert_ids_to_tokens(list(range(9))) == list(BPE_SPECIAL_TOKENS)
    assert 265 < trained.vocab_size <= 400


def test_ids_do_not_depend_on_vocab_size(corpus, tmp_path, trained):
    small = train_tokenizer([corpus / "a.txt"], tmp_path, vocab_size=280, min_frequency=1)
    assert small.vocab_size <= 280 < trained.vocab_size
    assert small.special == trained.special


def test_learns_frequent_words_and_round_trips_exactly(trained):
    assert len(trained.encode(" blank")) == 1  # "Ġblank", seen 50 times
    for text in EDGE + LINES[:4]:
        assert trained.decode(trained.encode(text)) == text


def test_blanks_in_text(trained):
    ids = trained.encode("fill the [MASK] and [sMASK] or [gMASK]")
    assert ids == trained.encode("fill the") + [4] + trained.encode(" and") + [8] + trained.encode(" or") + [7]


def test_saved_folder_loads_back(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n")  # a stale file does not override tokenizer_config.json
    back = load_tokenizer(tmp_path)
    assert isinstance(back, GLMTokenizer) and back.special == trained.special and back.kind == "bpe"
    for text in EDGE:
        assert back.encode(text) == trained.encode(text)


def test_transformers_loads_the_folder(trained, tmp_path):
    from transformers import AutoTokenizer

    trained.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.mask_token_id, hf.eos_token_id, hf.cls_token_id) == (4, 0, 3)
    text = "fill the [MASK] with text"
    assert hf.encode(text, add_special_tokens=False) == trained.encode(text)


def test_foreign_tokenizer_json_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE({"a": 0, "<|endoftext|>": 1}, [])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="'<\\|endoftext\\|>' has id 1, the GLM layout needs 0"):
        GLMTokenizer.from_pretrained(tmp_path)


def test_corpus_errors(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "text under another key"}) + "\n")
    with pytest.raises(ValueError, match="no usable text"):
        train_tokenizer([tmp_path / "blank.txt"], tmp_path / "out")
    with pytest.raises(ValueError, match="no usable text.*'text'"):
        train_tokenizer([tmp_path / "other.jsonl"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert train_tokenizer([tmp_path / "other.jsonl"], tmp_path / "out", 300, text_field="body").kind == "bpe"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "blank.txt", tmp_path / "missing.txt"], tmp_path / "x")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train_tokenizer([tmp_path / "bad.jsonl"], tmp_path / "x")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([tmp_path / "blank.txt"], tmp_path / "x", vocab_size=100)


def test_cli(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["train-tokenizer", str(corpus / "a.txt"), "--out", str(out), "--vocab-size", "300"]) == 0
    assert "[MASK] 4" in capsys.readouterr().out
    assert GLMTokenizer.from_pretrained(out).vocab_size <= 300
    assert main(["train-tokenizer", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2
    assert "nope.txt" in capsys.readouterr().err
