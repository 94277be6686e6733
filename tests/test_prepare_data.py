"""prepare-data: txt/jsonl/parquet inputs, skip counts, errors, memmap round trip, held-out split, CLI."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glmkit.config import SpecialTokens
from glmkit.data import prepare as prepare_module
from glmkit.data.packing import PackedDataset
from glmkit.data.prepare import prepare_data
from glmkit.data.shards import TokenShards


class CharTokenizer:
    """Stand-in for glmkit.tokenizer: one id per non-space character (``offset + ord(c) % 1000``)."""

    special = SpecialTokens(eos=0, pad=0, cls=1, mask=2, sop=3, eop=4, smask=5, gmask=6)

    def __init__(self, offset: int = 10, vocab_size: int = 1010):
        self.offset, self.vocab_size = offset, vocab_size

    def encode(self, text: str) -> list[int]:
        return [self.offset + ord(c) % 1000 for c in text if not c.isspace()]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - self.offset) for i in ids if i >= self.offset)


def squeeze(text: str) -> str:
    return "".join(text.split())


def all_docs(out) -> list[str]:
    tok = CharTokenizer()
    return [tok.decode(d.tolist()) for split in ("train", "val") for d in iter_split(out, split)]


def iter_split(out, split):
    docs = TokenShards(out, split)
    return [docs[i] for i in range(len(docs))]


@pytest.fixture
def corpus(tmp_path):
    """One folder with every input kind, good and bad records mixed."""
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"First doc.\nStill first.\n\nSecond doc!\n\n   \n\nThird \xff\xfe bad.\n\nFourth")
    lines = [
        json.dumps({"text": "json one.", "id": 1}),
        "",  # a blank line is no record
        json.dumps({"text": ""}),  # empty
        json.dumps({"text": None}),  # empty
        json.dumps({"body": "no text field"}),  # missing field
        json.dumps({"text": 42}),  # not text
        "{not json",  # undecodable
        json.dumps({"text": "json two?"}),
    ]
    (src / "sub" / "b.jsonl").write_text("\n".join(lines) + "\n")
    table = pa.table({"text": ["parquet one;", None, "  ", "parquet two:"], "n": [1, 2, 3, 4]})
    pq.write_table(table, src / "sub" / "c.parquet")
    (src / "ignored.md").write_text("not an input")
    return src


GOOD = ["First doc.\nStill first.", "Second doc!", "Fourth", "json one.", "json two?", "parquet one;", "parquet two:"]


def test_folder_of_every_kind_round_trips(corpus, tmp_path):
    out = tmp_path / "out"
    m = prepare_data([corpus], out, CharTokenizer(), val_fraction=0.0)
    assert m["documents"] == len(GOOD) and m["tokens"] == sum(len(squeeze(t)) for t in GOOD)
    assert (m["skipped_empty"], m["skipped_undecodable"], m["skipped_missing_field"]) == (5, 3, 1)
    assert m["dtype"] == "uint16" and json.loads((out / "manifest.json").read_text()) == m
    docs = TokenShards(out)
    assert [CharTokenizer().decode(docs[i].tolist()) for i in range(len(docs))] == [squeeze(t) for t in GOOD]
    assert isinstance(docs[0].base, np.memmap) or isinstance(docs[0], np.memmap)
    assert docs.lengths.tolist() == [len(squeeze(t)) for t in GOOD] and docs.num_tokens == m["tokens"]
    assert docs.special == CharTokenizer.special
    assert CharTokenizer().offset + ord(".") in docs.sentence_end_ids and 0 not in docs.sentence_end_ids
    assert len(TokenShards(out, "val")) == 0


def test_single_files_and_text_field(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hello there."}) + "\n")
    pq.write_table(pa.table({"content": ["from parquet"]}), tmp_path / "y.parquet")
    m = prepare_data(
        [tmp_path / "x.jsonl", str(tmp_path / "y.parquet")], tmp_path / "o", CharTokenizer(), 0.0, "content"
    )
    assert m["documents"] == 2 and all_docs(tmp_path / "o") == ["hellothere.", "fromparquet"]
    with pytest.raises(ValueError, match="no column 'text'"):
        prepare_data([tmp_path / "y.parquet"], tmp_path / "o2", CharTokenizer())


def test_errors_name_the_problem(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare_data([corpus, tmp_path / "missing.txt"], tmp_path / "o", CharTokenizer())
    with pytest.raises(ValueError, match="unsupported"):
        prepare_data([corpus / "ignored.md"], tmp_path / "o", CharTokenizer())
    (tmp_path / "blank.txt").write_text("\n\n  \n\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no usable text"):
        prepare_data([tmp_path / "blank.txt", tmp_path / "bad.jsonl"], tmp_path / "o", CharTokenizer())
    assert not list((tmp_path / "o").iterdir())  # nothing half-written is left behind
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_data([corpus], tmp_path / "o", CharTokenizer(), val_fraction=1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        prepare_data([corpus], tmp_path / "o", CharTokenizer(offset=600, vocab_size=700))
    prepare_data([corpus], tmp_path / "o", CharTokenizer())
    with pytest.raises(ValueError, match="overwrite"):
        prepare_data([corpus], tmp_path / "o", CharTokenizer())
    prepare_data([corpus], tmp_path / "o", CharTokenizer(), overwrite=True)


def test_held_out_split_and_shards(tmp_path):
    r = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma.", "delta", "eps!"]
    docs = [" ".join(r.choice(words, size=r.integers(3, 40))) + f" {i}" for i in range(300)]
    (tmp_path / "big.txt").write_text("\n\n".join(docs))
    m = prepare_data(
        [tmp_path / "big.txt"], tmp_path / "o", CharTokenizer(), val_fraction=0.2, seed=1, shard_tokens=2000
    )
    train, val = TokenShards(tmp_path / "o"), TokenShards(tmp_path / "o", "val")
    assert len(train) + len(val) == 300 and 30 <= len(val) <= 90
    assert len(m["splits"]["train"]["shards"]) > 3  # rolled over into several shard files
    assert sorted(all_docs(tmp_path / "o")) == sorted(squeeze(d) for d in docs)  # disjoint, nothing lost
    again = prepare_data([tmp_path / "big.txt"], tmp_path / "o2", CharTokenizer(), 0.2, seed=1, shard_tokens=2000)
    other = prepare_data([tmp_path / "big.txt"], tmp_path / "o3", CharTokenizer(), 0.2, seed=2, shard_tokens=2000)
    assert again["splits"] == m["splits"] and all_docs(tmp_path / "o2") == all_docs(tmp_path / "o")
    assert other["splits"]["val"]["documents"] != m["splits"]["val"]["documents"] or all_docs(
        tmp_path / "o3"
    ) != all_docs(tmp_path / "o")
    # the packer reads the shards directly
    ds = PackedDataset(train, 64, train.special, sentence_end_ids=train.sentence_end_ids)
    assert ds[5][0] == train.special.cls and len(ds[5]) <= 64 and np.array_equal(ds[5], ds[5])


def test_parallel_tokenization_matches_serial(corpus, tmp_path):
    a = prepare_data([corpus], tmp_path / "a", CharTokenizer(), val_fraction=0.3)
    b = prepare_data([corpus], tmp_path / "b", CharTokenizer(), val_fraction=0.3, num_proc=2)
    assert a["splits"] == b["splits"]
    for shard in a["splits"]["train"]["shards"]:
        assert (tmp_path / "a" / shard["tokens_file"]).read_bytes() == (
            tmp_path / "b" / shard["tokens_file"]
        ).read_bytes()


def test_large_vocabulary_uses_uint32(tmp_path):
    (tmp_path / "t.txt").write_text("abc\n\nde")
    tok = CharTokenizer(offset=66000, vocab_size=67000)
    m = prepare_data([tmp_path / "t.txt"], tmp_path / "o", tok, val_fraction=0.0)
    docs = TokenShards(tmp_path / "o")
    assert m["dtype"] == "uint32" and docs[1].tolist() == tok.encode("de")


def test_cli(tmp_path, corpus, monkeypatch, capsys):
    from glmkit.cli import main

    monkeypatch.setattr(prepare_module, "_load_tokenizer", lambda path: CharTokenizer())
    assert (
        main(["prepare-data", str(corpus), "--out", str(tmp_path / "o"), "--tokenizer", "tok", "--val-fraction", "0"])
        == 0
    )
    assert "7 documents" in capsys.readouterr().out
    assert main(["prepare-data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o2"), "--tokenizer", "t"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
