"""Small ChatGLM tokenizer folders built from scratch, in the hub layouts and with the real special-token layouts.

Each vocabulary is trained here (SentencePiece's trainer on a short Chinese + English text, or a tiktoken BPE from a
handful of merges), so the ids of ordinary text differ from the released files, while every special token sits where
the released tokenizers put it relative to the trained pieces (chatglm-6b ``ice_text.model``: the control pieces,
``<|tab|>``, ``<|blank_2..80|>`` and the byte pieces after the text pieces; chatglm2/3: specials appended after the
model's pieces; glm-4: 14 specials after the ranks). The files are written by hand, not by glmkit, so loading them
tests glmkit's reader against the hub format.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

CORPUS = [
    "你好，世界！今天天气很好。我们在北京学习人工智能。",
    "晚上睡不着应该怎么办？可以听音乐，也可以看书。",
    "hello world, the quick brown fox jumps over the lazy dog.",
    "def main(): print('hello world')",  # no newline: as in the releases, "\\n" falls back to a byte
    "The king said unto them: go and see what the lord hath done.",
    "机器学习和深度学习是人工智能的重要方向。",
]


def _train(**options) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 40), model_writer=out, model_type="unigram", character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2, **options,
    )  # fmt: skip
    return out.getvalue()


def _write_config(folder: Path, config: dict) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def build_chatglm6b_tokenizer(folder: Path) -> int:
    """``ice_text.model`` as the final chatglm-6b revision lays it out: ``<unk> <s> </s> <pad> <n> ...`` text pieces,
    then [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK> (control), <|tab|>, <|blank_2..80|>
    (user-defined), 256 byte pieces (byte fallback). Returns the number of text pieces (130000 in the release)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(_train(vocab_size=500, pad_id=3, user_defined_symbols=["<n>"],
                                 normalization_rule_name="identity", remove_extra_whitespaces=False))  # fmt: skip
    n = len(proto.pieces)
    Piece = pb.ModelProto.SentencePiece
    for s in ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"):
        proto.pieces.append(Piece(piece=s, score=0.0, type=Piece.CONTROL))
    for s in ["<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]:
        proto.pieces.append(Piece(piece=s, score=0.0, type=Piece.USER_DEFINED))
    for b in range(256):
        proto.pieces.append(Piece(piece=f"<0x{b:02X}>", score=0.0, type=Piece.BYTE))
    proto.trainer_spec.byte_fallback = True
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ice_text.model").write_bytes(proto.SerializeToString())
    _write_config(folder, {
        "name_or_path": "THUDM/chatglm-6b", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
        "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
        "num_image_tokens": 0, "padding_side": "left", "remove_space": False, "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
    })  # fmt: skip
    return n


def build_chatglm2_tokenizer(folder: Path, chatglm3: bool = False) -> int:
    """``tokenizer.model`` like chatglm2/3's: ``<unk> <s> </s>``, 256 byte pieces (``"\\n"`` = 13), text pieces;
    the specials are not in the file (the tokenizer appends them). A ChatGLM3 folder's ``tokenizer_config.json``
    lists the role tokens. Returns the piece count (64789 in the release)."""
    import sentencepiece as spm

    model = _train(vocab_size=600, byte_fallback=True, normalization_rule_name="identity",
                   remove_extra_whitespaces=False, split_digits=True)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model)
    n = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    config = {"tokenizer_class": "ChatGLMTokenizer", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
              "padding_side": "left", "remove_space": False, "do_lower_case": False}  # fmt: skip
    if chatglm3:
        names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                 "<|observation|>"]  # fmt: skip
        config["added_tokens_decoder"] = {str(n + k): {"content": s, "special": True} for k, s in enumerate(names)}
        config["chat_template"] = (
            "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n "
            "{{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    _write_config(folder, config)
    return n


GLM4_MERGES = [
    b"th", b"the", b" t", b" the", b"he", b"ll", b"llo", b"hello", b" w", b"or", b"orld", b" world",
    "你".encode(), "好".encode(), "你好".encode(), "世".encode(), "界".encode(), "世界".encode(), b"  ", b"    ",
    b"\n\n", b"in", b"ing",
]  # fmt: skip


def glm4_ranks() -> dict[bytes, int]:
    """A byte-level BPE: the 256 bytes, then each merge (with the byte prefixes a multi-byte merge needs)."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in GLM4_MERGES:
        for k in range(2, len(token) + 1):  # a merge's parts must be tokens before it (tiktoken's BPE rule)
            ranks.setdefault(token[:k], len(ranks))
    return ranks


def build_glm4_tokenizer(folder: Path) -> int:
    """GLM-4's ``tokenizer.model`` (``base64(token) rank`` lines) and its ``tokenizer_config.json`` listing the 14
    specials after the ranks (151329.. in the release). Returns the rank count."""
    ranks = glm4_ranks()
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    names = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
             "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
             "<|end_of_video|>"]  # fmt: skip
    n = len(ranks)
    _write_config(folder, {
        "tokenizer_class": "ChatGLM4Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "padding_side": "left", "remove_space": False, "do_lower_case": False,
        "added_tokens_decoder": {str(n + k): {"content": s, "special": True} for k, s in enumerate(names)},
    })  # fmt: skip
    return n
