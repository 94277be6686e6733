"""GLMTokenizer on locally built stand-ins for each released tokenizer: the TV10 ids
(docs/glm-notes.md), [MASK] in text, round trips.

No hub downloads: each fixture builds files with the released sizes (BERT 30522 lines, GPT-2 50257 entries, RoBERTa
50265, SentencePiece 50000 pieces) whose special entries sit at their real ids and whose other entries are learned
from a small corpus or are filler, so the "size + offset" ids come out exactly as with the real files.
"""

import io
import json
import string

import pytest

from glmkit.config import GPT2_SPECIAL_TOKENS, SpecialTokens
from glmkit.tokenizer import GLMTokenizer, WhitespaceTokenizer, load_tokenizer

CORPUS = [
    "Paris is the capital of France.",
    "Hello world, this is a small test corpus for the tokenizer.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "北京是中国的首都。上海是一座城市。今天天气很好，我们去公园散步吧。",
] * 20
EDGE = ["", " ", "   ", "\n", "\t\n ", "  two  spaces  ", "naïve café", "日本語のテキスト", "emoji 😀👍🏽 ok",
        "zero\u200bwidth", "e\u0301 combining", "Paris is the capital of France."]  # fmt: skip


def _byte_bpe(n_merges_vocab: int = 400) -> tuple[list[str], list[str]]:
    """A small byte-level BPE learned from CORPUS: (tokens in id order, merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=n_merges_vocab, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def _write_bpe(folder, vocab: list[str], merges: list[str]) -> None:
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _filler(vocab: list[str], size: int) -> list[str]:
    return vocab + [f"<filler{i}>" for i in range(size - len(vocab))]


def _sentencepiece_proto(pieces: int | None) -> bytes:
    """A unigram model trained on CORPUS (pieces 0..3 = <unk> <s> </s> <n> as in cog-pretrain.model), optionally
    padded with UNUSED pieces (never produced) to ``pieces`` pieces."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=150,
                                   user_defined_symbols=["<n>"], hard_vocab_limit=False, minloglevel=2)  # fmt: skip
    model = pb.ModelProto()
    model.ParseFromString(buf.getvalue())
    for i in range(len(model.pieces), pieces or 0):
        model.pieces.add(piece=f"<unused{i}>", score=0.0, type=pb.ModelProto.SentencePiece.UNUSED)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    words = ["paris", "is", "the", "capital", "of", "france", "hello", "world", "naive", "cafe", "test"]
    letters = list(string.ascii_lowercase + string.digits)
    bert = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    bert += letters + list(string.punctuation) + ["##" + c for c in letters] + words
    (root / "bert").mkdir()
    (root / "bert" / "vocab.txt").write_text("\n".join(_filler(bert, 30522)) + "\n")
    tokens, merges = _byte_bpe()
    _write_bpe(root / "gpt2", _filler(tokens, 50256) + ["<|endoftext|>"], merges)
    _write_bpe(root / "roberta", _filler(["<s>", "<pad>", "</s>", "<unk>"] + tokens, 50264) + ["<mask>"], merges)
    (root / "sentencepiece").mkdir()
    (root / "sentencepiece" / "cog-pretrain.model").write_bytes(_sentencepiece_proto(50000))
    return {k: root / k for k in ("bert", "gpt2", "roberta", "sentencepiece")}


@pytest.fixture(scope="module")
def toks(folders):
    return {k: GLMTokenizer.from_pretrained(f) for k, f in folders.items()}


KINDS = ["bert", "gpt2", "roberta", "sentencepiece"]
TV10 = {
    "bert": SpecialTokens(eos=0, pad=0, cls=101, mask=103, sop=30522, eop=30523, sep=102, unk=100),
    "gpt2": GPT2_SPECIAL_TOKENS,
    "roberta": SpecialTokens(eos=2, pad=2, cls=0, mask=50264, sop=50265, eop=50266, sep=2, unk=3),
    "sentencepiece": SpecialTokens(eos=50000, pad=50000, sep=50001, cls=50002, mask=50003, unk=50004, sop=50006,
                                   eop=50007, smask=50008, gmask=50009),
}  # fmt: skip
VOCAB_SIZE = {"bert": 30524, "gpt2": 50265, "roberta": 50267, "sentencepiece": 50010}


@pytest.mark.parametrize("kind", KINDS)
def test_special_ids_match_tv10(toks, kind):
    tok = toks[kind]
    assert tok.kind == kind
    assert tok.special == TV10[kind]
    assert tok.vocab_size == VOCAB_SIZE[kind]
    assert tok.token_to_id("<|startofpiece|>") == tok.special.sop
    assert tok.token_to_id("<|endofpiece|>") == tok.special.eop
    assert tok.token_to_id("[MASK]") == tok.special.mask
    assert tok.convert_ids_to_tokens([tok.special.sop, tok.special.eop]) == ["<|startofpiece|>", "<|endofpiece|>"]


def test_task_mask_ids(folders):
    bert = GLMTokenizer.from_pretrained(folders["bert"], task_mask=True).special
    assert (bert.gmask, bert.smask, bert.sop, bert.eop) == (30524, 30525, 30522, 30523)
    roberta = GLMTokenizer.from_pretrained(folders["roberta"], task_mask=True).special
    assert (roberta.gmask, roberta.smask) == (50267, 50268)
    gpt2 = GLMTokenizer.from_pretrained(folders["gpt2"], task_mask=False)
    assert (gpt2.special.gmask, gpt2.special.smask, gpt2.vocab_size) == (None, None, 50263)
    assert len(gpt2.encode("[gMASK]")) > 1  # no longer one token
    sp = GLMTokenizer.from_pretrained(folders["sentencepiece"], task_mask=False).special
    assert (sp.gmask, sp.smask, sp.eop) == (None, None, 50007)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_in_text_is_one_token_with_lstrip(toks, kind):
    tok = toks[kind]
    ids = tok.encode("Paris is the [MASK] of France")
    assert ids.count(tok.special.mask) == 1
    assert ids == tok.encode("Paris is the") + [tok.special.mask] + tok.encode(" of France")
    for blank, want in (("[sMASK]", tok.special.smask), ("[gMASK]", tok.special.gmask)):
        if want is not None:
            assert tok.encode(f"Paris is the {blank}") == tok.encode("Paris is the") + [want]


def test_roberta_glm_strings_alias_roberta_entries(toks):
    tok = toks["roberta"]
    assert tok.encode("a [MASK]") == tok.encode("a <mask>") == tok.encode("a") + [50264]
    assert tok.encode("[CLS]x[SEP]") == [0] + tok.encode("x") + [2]
    assert tok.convert_ids_to_tokens([50264]) == ["<mask>"]


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_byte_level_round_trip_is_exact(toks, kind):
    tok = toks[kind]
    for text in EDGE:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("") == []


def test_bert_round_trip_normalises(toks):
    tok = toks["bert"]
    assert tok.decode(tok.encode("Paris is the [MASK] of France.")) == "paris is the [MASK] of france."
    assert tok.decode(tok.encode("Naïve CAFÉ")) == "naive cafe"
    assert tok.encode("") == tok.encode("  \n\t ") == []
    assert tok.encode("😀") == [tok.special.unk]
    for text in EDGE:  # decoding gives the normalised text, which encodes to the same ids
        assert tok.encode(tok.decode(tok.encode(text))) == tok.encode(text)


def test_sentencepiece_round_trip_and_unseen_characters(toks):
    tok = toks["sentencepiece"]
    for text in ["北京是中国的首都。", "Paris is the capital of France.", "今天天气很好"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("") == tok.encode("   ") == []
    assert tok.decode(tok.encode("  Paris   is ")) == "Paris is"  # SentencePiece collapses whitespace
    for text in (t for t in EDGE if 0 not in tok.encode(t)):  # <unk> decodes as "⁇": lossy by design
        assert tok.encode(tok.decode(tok.encode(text))) == tok.encode(text)
    # THUDM/GLM#140: unseen characters become <unk> = 0 (not [UNK] = 50004) and decode as "⁇"
    assert 0 in tok.encode("岿") and tok.special.unk not in tok.encode("岿")
    assert tok.decode(tok.encode("岿")).strip() == "⁇"
    assert tok.decode(tok.encode("北京是[MASK]的首都")) == "北京是[MASK]的首都"


@pytest.mark.parametrize("kind", KINDS)
def test_decode_special_tokens_and_skip(toks, kind):
    tok = toks[kind]
    sp = tok.special
    ids = [sp.cls] + tok.encode("hello world") + [sp.mask, sp.eos, sp.sop] + tok.encode("paris") + [sp.eop]
    text = tok.decode(ids)
    for s in ("<|startofpiece|>", "<|endofpiece|>"):
        assert s in text
    plain = tok.decode(ids, skip_special_tokens=True)
    assert "<|" not in plain and "MASK" not in plain.upper() and "hello" in plain.lower()


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_behaves_identically(toks, tmp_path, kind):
    tok = toks[kind]
    tok.save_pretrained(tmp_path)
    back = GLMTokenizer.from_pretrained(tmp_path)
    assert (back.kind, back.special, back.vocab_size) == (tok.kind, tok.special, tok.vocab_size)
    for text in EDGE + ["Paris is the [MASK] of France [sMASK] and [gMASK]", "北京是[MASK]的首都"]:
        ids = tok.encode(text)
        assert back.encode(text) == ids
        assert back.decode(ids) == tok.decode(ids)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"].startswith("GLM")


def test_sentencepiece_ids_are_piece_count_plus_offset(tmp_path):
    (tmp_path / "cog-pretrain.model").write_bytes(_sentencepiece_proto(None))
    tok = GLMTokenizer.from_pretrained(tmp_path)
    n = tok.special.eos
    assert n < 50000
    assert tok.special == SpecialTokens(eos=n, pad=n, sep=n + 1, cls=n + 2, mask=n + 3, unk=n + 4, sop=n + 6,
                                        eop=n + 7, smask=n + 8, gmask=n + 9)  # fmt: skip
    with pytest.raises(ValueError, match=f"id {n + 5} is not assigned"):
        tok.decode([n + 5])  # 50005 with the released model: never assigned


def test_hub_tokenizer_config_and_added_tokens(folders, tmp_path):
    hub = tmp_path / "glm-10b-chinese"
    hub.mkdir()
    (hub / "cog-pretrain.model").write_bytes((folders["sentencepiece"] / "cog-pretrain.model").read_bytes())
    (hub / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GLMChineseTokenizer"}))
    added = {"<|endoftext|>": 50000, "[SEP]": 50001, "[CLS]": 50002, "[MASK]": 50003, "[UNK]": 50004,
             "<|startofpiece|>": 50006, "<|endofpiece|>": 50007, "[sMASK]": 50008, "[gMASK]": 50009}  # fmt: skip
    (hub / "added_tokens.json").write_text(json.dumps(added))
    assert GLMTokenizer.from_pretrained(hub).special == TV10["sentencepiece"]
    (hub / "added_tokens.json").write_text(json.dumps(added | {"[gMASK]": 50007}))  # the pre-HF 10B-Chinese id
    with pytest.raises(ValueError, match=r"'\[gMASK\]' is id 50007.*50009"):
        GLMTokenizer.from_pretrained(hub)
    (hub / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GLMGPT2Tokenizer"}))
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt is missing"):
        GLMTokenizer.from_pretrained(hub)


def test_added_tokens_decide_task_mask(folders, tmp_path):
    bert = GLMTokenizer.from_pretrained(folders["bert"], task_mask=True)
    bert.save_pretrained(tmp_path)
    assert GLMTokenizer.from_pretrained(tmp_path).special.gmask == 30524
    gpt2 = GLMTokenizer.from_pretrained(folders["gpt2"], task_mask=False)
    gpt2.save_pretrained(tmp_path / "g")
    assert GLMTokenizer.from_pretrained(tmp_path / "g").special.gmask is None


def test_clear_errors(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        GLMTokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"vocab\.txt.*merges\.txt.*tokenizer\.json.*notes\.md"):
        GLMTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"no \[MASK\] entry"):
        GLMTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="id 50265 is not assigned"):
        GLMTokenizer.from_pretrained(folders["gpt2"], task_mask=False).decode([50265])


def test_whitespace_tokenizer():
    tok = load_tokenizer(None)
    assert isinstance(tok, WhitespaceTokenizer)
    sp = tok.special
    assert (sp.eos, sp.sop, sp.eop, sp.cls, sp.mask, sp.gmask, sp.smask) == (0, 1, 2, 3, 4, 7, 8)
    assert tok.encode("Paris is the[MASK] of  France") == [9, 10, 11, 4, 12, 13]
    assert tok.encode("France is [sMASK] [gMASK]") == [13, 10, 8, 7]
    assert tok.decode([3, 9, 4, 0]) == "[CLS] Paris [MASK] <|endoftext|>"
    assert tok.decode([3, 9, 4, 0], skip_special_tokens=True) == "Paris"
    assert (tok.vocab_size, tok.token_to_id("of"), tok.token_to_id("nope")) == (14, 12, None)
    with pytest.raises(ValueError, match="id 99"):
        tok.decode([99])


def test_load_tokenizer_dispatches(folders, tmp_path):
    ws = WhitespaceTokenizer()
    ws.encode("a b c")
    ws.save_pretrained(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, WhitespaceTokenizer) and back.encode("c b a [MASK]") == [11, 10, 9, 4]
    assert load_tokenizer(folders["gpt2"]).kind == "gpt2"
