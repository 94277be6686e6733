"""The pretraining collator and sample packing: TV1-TV3 through the collator, then the statistics of packing and
the objectives (docs/glm-notes.md, "Pretraining data")."""

import random

import numpy as np
import pytest
import torch

from glmkit.config import ConfigError, SpecialTokens
from glmkit.data.blank_infill import BlankInfillCollator, BlankInfillConfig, PretrainBatches
from glmkit.data.packing import PackedDataset, rank_batch_indices, sentence_end_ids
from glmkit.masks import BlankSample, collate

EOS, CLS, MASK, SOP, EOP, SMASK, GMASK, DBLOCK, DOT = 0, 1, 2, 3, 4, 5, 6, 8, 7
SPECIAL = SpecialTokens(eos=EOS, pad=EOS, cls=CLS, mask=MASK, sop=SOP, eop=EOP, smask=SMASK, gmask=GMASK)
SEQ = 256


class Scripted(random.Random):
    """A generator that answers from scripts, to drive the collator down an exact path."""

    def __init__(self, randoms=(), choices=(), randranges=(), randints=(), reverse_shuffles=False):
        super().__init__(0)
        self.script = {"random": list(randoms), "choices": list(choices), "randrange": list(randranges)}
        self.script["randint"] = list(randints)
        self.reverse_shuffles = reverse_shuffles

    def random(self):
        return self.script["random"].pop(0)

    def choices(self, population, weights=None, k=1):
        return [self.script["choices"].pop(0)]

    def randrange(self, *args):
        return self.script["randrange"].pop(0)

    def randint(self, a, b):
        return self.script["randint"].pop(0)

    def shuffle(self, x):
        if self.reverse_shuffles:
            x.reverse()


def collator(**kw) -> BlankInfillCollator:
    return BlankInfillCollator(BlankInfillConfig(seq_length=SEQ, **kw), SPECIAL, sentence_end_ids=[DOT])


@pytest.fixture(scope="module")
def texts() -> list[np.ndarray]:
    """3200 packed samples of synthetic documents ([DOT] ends a sentence about every 14 tokens)."""
    r = np.random.default_rng(0)
    docs = [np.where(r.random(n) < 0.07, DOT, r.integers(10, 500, n)) for n in r.integers(20, 800, 400)]
    ds = PackedDataset(docs, SEQ, SPECIAL, sentence_end_ids=[DOT])
    return [ds[i] for i in range(3200)]


def build_all(col: BlankInfillCollator, texts, batch_size: int = 16):
    for b in range(0, len(texts), batch_size):
        yield texts[b : b + batch_size], col.build(texts[b : b + batch_size], col.rng(b))


def segments(s: BlankSample) -> list[range]:
    starts = [i for i in range(s.sep, len(s)) if s.block_position_ids[i] == 1]
    return [range(a, b) for a, b in zip(starts, starts[1:] + [len(s)], strict=True)]


def check_layout(s: BlankSample, text: list[int], blank_ids: set[int]) -> list[tuple[int, int]]:
    """Every position, mask and span invariant of one block sample (docs/glm-notes.md); returns its spans as
    (blank position, length)."""
    assert s.loss_mask == [0] * s.sep + [1] * (len(s) - s.sep)
    assert s.position_ids[: s.sep] == list(range(s.sep)) and set(s.block_position_ids[: s.sep]) == {0}
    fills = {}
    for seg, blank in zip(segments(s), s.blank_positions, strict=True):
        n = len(seg) - 1
        assert s.tokens[seg.start] == SOP and s.tokens[blank] in blank_ids
        assert [s.position_ids[i] for i in seg] == [blank] * (n + 1)
        assert [s.block_position_ids[i] for i in seg] == list(range(1, n + 2))
        assert [s.targets[i] for i in seg] == s.tokens[seg.start + 1 : seg.stop] + [EOP]
        fills[blank] = s.tokens[seg.start + 1 : seg.stop]
    restored = []
    for i, t in enumerate(s.tokens[: s.sep]):
        restored += fills[i] if i in fills else [t]
    assert restored == text  # Part A + Part B is exactly the text: spans are disjoint and in place
    return [(p, len(f)) for p, f in sorted(fills.items())]


# ---- TV1-TV3 exactly -------------------------------------------------------------------------------------


def test_tv1_through_collator_layout():
    col = collator()
    s = col.layout([CLS, 11, 12, 13, 14, 15, 16], [(3, 4), (5, 7)], MASK, Scripted(reverse_shuffles=True))
    assert s.tokens == [CLS, 11, 12, MASK, 14, MASK, SOP, 15, 16, SOP, 13]
    assert s.position_ids == [0, 1, 2, 3, 4, 5, 5, 5, 5, 3, 3]
    assert s.block_position_ids == [0, 0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert s.targets[6:] == [15, 16, EOP, 13, EOP] and s.loss_mask == [0] * 6 + [1] * 5 and s.sep == 6
    m = collate([s], pad_id=EOS)["attention_mask"][0, 0]
    assert all(bool(m[i, j]) == (j < 6 or j <= i) for i in range(11) for j in range(11))


def test_tv2_through_token_mode():
    # short-seq draw, single-span draw, mode draw; one span of length 2 placed at offset 1 + 1
    rng = Scripted(randoms=[0.9, 0.9, 0.0], choices=[2], randranges=[1])
    out = collator(mask_ratio=0.34).build([[CLS, 11, 12, 13, 14, 15]], rng)
    s = out.samples[0]
    assert out.objective == "bert" and out.dropped == 0
    assert s.tokens == [CLS, 11, MASK, 14, 15, SOP, 12, 13] and s.sep == 5
    assert s.position_ids == [0, 1, 2, 3, 4, 2, 2, 2] and s.block_position_ids == [0, 0, 0, 0, 0, 1, 2, 3]
    assert s.targets[5:] == [12, 13, EOP]


def test_tv3_through_document_mode():
    rng = Scripted(randoms=[0.9, 0.9, 0.99, 0.0], randints=[4])  # gpt mode, n = 4, prefix-LM form
    out = collator(bert_prob=0.0).build([[CLS, 11, 12, 13, 14, 15, 16, 17]], rng)
    s = out.samples[0]
    assert out.objective == "gpt"
    assert s.tokens == [CLS, 11, 12, 13, GMASK, SOP, 14, 15, 16]
    assert s.position_ids == [0, 1, 2, 3, 4, 4, 4, 4, 4] and s.block_position_ids == [0, 0, 0, 0, 0, 1, 2, 3, 4]
    assert s.sep == 5 and s.targets[5:] == [14, 15, 16, 17] and s.loss_mask == [0] * 5 + [1] * 4


# ---- token mode statistics -------------------------------------------------------------------------------


def test_token_mode_statistics(texts):
    col = collator()
    fractions, lengths, shuffled, n = [], [], 0, 0
    for batch, out in build_all(col, texts):
        assert out.objective == "bert" and out.dropped == 0
        for text, s in zip(batch, out.samples, strict=True):
            text = text.tolist()
            spans = check_layout(s, text, {MASK})
            masked = sum(k for _, k in spans)
            goal = int(0.15 * len(text))
            assert goal <= masked < goal + 39
            for (p1, _), (p2, _) in zip(spans, spans[1:], strict=False):
                assert p2 > p1 + 1  # blanks never touch: at least one unmasked token between spans
            for seg in segments(s):
                assert not {EOS, CLS} & set(s.tokens[seg.start + 1 : seg.stop])  # spans stay inside a document
            assert s.tokens[0] == CLS and s.tokens[s.sep - 1] == text[-1]  # [CLS] and the last token never masked
            fractions.append(masked / len(text))
            lengths += [k for _, k in spans]
            shuffled += s.blank_positions != sorted(s.blank_positions)
            n += 1
    assert 0.15 <= np.mean(fractions) <= 0.16
    assert shuffled / n > 0.9  # Part B is a random permutation, not left to right
    w = np.array(col.config.span_length_weights())
    w /= w.sum()
    counts = np.bincount(lengths, minlength=40)[1:40]
    assert abs(np.mean(lengths) - (w * np.arange(1, 40)).sum()) < 0.08  # truncated Poisson(3): mean 3.157
    obs, exp = np.append(counts[:8], counts[8:].sum()), np.append(w[:8], w[8:].sum()) * len(lengths)
    assert ((obs - exp) ** 2 / exp).sum() < 30  # chi-square, 8 dof (p ~ 2e-4)
    assert 0.5 * np.abs(counts / len(lengths) - w).sum() < 0.02


def test_span_length_weights_are_poisson():
    w = BlankInfillConfig().span_length_weights()
    assert len(w) == 39
    assert w[2] == pytest.approx(np.exp(-3) * 27 / 6, rel=1e-12)


def test_short_documents_are_dropped_and_counted():
    # 40 documents of 3-6 tokens: the longest cannot take the remaining spans, as in the reference
    r = random.Random(0)
    text = []
    while len(text) < 200:
        text += [CLS] + [r.randint(10, 99) for _ in range(r.randint(3, 6))] + [EOS]
    col = collator()
    out = col.build([text] * 4, random.Random(1))
    assert out.dropped == 4 and out.samples == []
    with pytest.raises(ValueError, match="dropped"):
        col([text] * 4, 0)


# ---- sentence and document modes ---------------------------------------------------------------------------


def test_sentence_mode_covers_whole_sentences(texts):
    col = collator(bert_prob=0.0, gap_sentence_prob=1.0)
    for batch, out in build_all(col, texts[:800]):
        assert out.objective == "sentence"
        for text, s in zip(batch, out.samples, strict=True):
            text = text.tolist()
            spans = check_layout(s, text, {SMASK})
            assert sum(k for _, k in spans) >= int(0.15 * len(text))
            # a sentence starts after [CLS] / a sentence end and ends at a sentence end or the text's end
            for seg in segments(s):
                sentence = s.tokens[seg.start + 1 : seg.stop]
                assert CLS not in sentence and EOS not in sentence and DOT not in sentence[:-1]


def test_document_mode_covers_half_to_all(texts):
    col = collator(bert_prob=0.0, gpt_infill_prob=0.5)
    forms = {"prefix": 0, "infill": 0}
    whole = 0  # samples blanked up to their maximum, L - 2 tokens
    for batch, out in build_all(col, texts[:800]):
        assert out.objective == "gpt" and out.dropped == 0
        lens = [len(t) for t in batch]
        for text, s in zip(batch, out.samples, strict=True):
            text = text.tolist()
            assert s.tokens[: s.sep].count(GMASK) == 1
            if SOP in s.tokens and EOP not in s.targets:  # prefix-LM form: [gMASK] last in Part A, no eop
                forms["prefix"] += 1
                n = len(s) - s.sep
                assert s.tokens[s.sep - 1] == GMASK and s.targets[s.sep :] == text[len(text) - n :]
                assert s.loss_mask[s.sep :] == [int(t != CLS) for t in text[len(text) - n :]]
            else:
                forms["infill"] += 1
                assert EOS not in text or text.index(EOS) == len(text) - 1  # only single documents
                ((_, n),) = check_layout(s, text, {GMASK})
            assert int(0.5 * min(lens)) <= n <= len(text) - 2
            whole += n == len(text) - 2
    assert forms["prefix"] > 0 and forms["infill"] > 0 and whole > 0


def test_objective_is_drawn_per_batch(texts):
    col = collator(bert_prob=0.5, gap_sentence_prob=0.3)
    seen = [col.build(texts[:2], col.rng(b)).objective for b in range(1000)]
    assert abs(seen.count("bert") / 1000 - 0.5) < 0.06
    assert abs(seen.count("sentence") / 1000 - 0.3) < 0.06
    assert abs(seen.count("gpt") / 1000 - 0.2) < 0.05


def test_block_mask_replaces_span_inputs_only(texts):
    col = collator(block_mask_prob=0.5, dblock_id=DBLOCK)
    out = col.build(texts[:8], col.rng(3))
    masked = 0
    for s in out.samples:
        for seg in segments(s):
            assert s.tokens[seg.start] == SOP  # sop is never replaced, targets never are
            inputs, targets = s.tokens[seg.start + 1 : seg.stop], [s.targets[i] for i in seg][:-1]
            assert all(t == DBLOCK or t == g for t, g in zip(inputs, targets, strict=True))
            masked += inputs.count(DBLOCK)
    assert masked > 0


def test_short_sequence_resplit(texts):
    col = collator(short_seq_prob=1.0)
    counts = []
    for b in range(20):
        out = col.build(texts[:4], col.rng(b))
        counts.append(len(out.samples))
        for s in out.samples:
            restored_length = s.sep + sum(len(seg) - 2 for seg in segments(s))
            assert s.tokens[0] == CLS and restored_length <= SEQ - 1  # a piece is [CLS] + < seq_length - 1 tokens
    assert max(counts) > 4  # short target lengths give several pieces per sample


# ---- batches: tensors, reproducibility, ranks ----------------------------------------------------------------


def test_batches_are_reproducible_and_differ_by_rank(texts):
    cfg = BlankInfillConfig(seq_length=SEQ, bert_prob=0.4, gap_sentence_prob=0.3, seed=5)
    ranks = [BlankInfillCollator(cfg, SPECIAL, sentence_end_ids=[DOT], dp_rank=r, dp_world=2) for r in (0, 1)]
    a, b = ranks[0](texts[:4], 7), ranks[0](texts[:4], 7)
    assert (
        all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor)) and a["objective"] == b["objective"]
    )
    assert not torch.equal(a["input_ids"], ranks[1](texts[:4], 7)["input_ids"])
    assert not torch.equal(a["input_ids"], ranks[0](texts[:4], 8)["input_ids"])
    # the tensors are masks.collate's: loss only on Part B, padding never attended
    for row in range(4):
        sep, n = int(a["sep"][row]), int(a["lengths"][row])
        assert a["loss_mask"][row, :sep].sum() == 0 and a["loss_mask"][row, sep:n].sum() > 0
        assert not a["attention_mask"][row, 0, :, n:].any()
    assert list(rank_batch_indices(3, 4, dp_rank=1, dp_world=2)) == [28, 29, 30, 31]


def test_pretrain_batches_resume_exactly(texts):
    col = collator(bert_prob=0.5, gap_sentence_prob=0.3)
    source = PretrainBatches(texts, col, batch_size=4)
    first = [source(g) for g in range(3)]
    again = source(2)  # a resumed run asks for batch 2 directly
    assert torch.equal(first[2]["input_ids"], again["input_ids"]) and first[2]["objective"] == again["objective"]
    assert {"input_ids", "position_ids", "attention_mask", "targets", "loss_mask", "objective"} <= set(again)


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"mask_ratio": 1.5}, "mask_ratio"),
        ({"bert_prob": 0.8, "gap_sentence_prob": 0.3}, "gap_sentence_prob"),
        ({"bert_prob": -0.1}, "bert_prob"),
        ({"gpt_min_ratio": 0.0}, "gpt_min_ratio"),
        ({"block_mask_prob": 0.1}, "dblock_id"),
        ({"max_block_length": 1}, "max_block_length"),
        ({"seq_length": 20, "short_seq_prob": 0.1}, "seq_length"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        BlankInfillConfig(**kw)


def test_collator_argument_errors():
    with pytest.raises(ValueError, match="sentence_end_ids"):
        BlankInfillCollator(BlankInfillConfig(bert_prob=0.5, gap_sentence_prob=0.5), SPECIAL)
    with pytest.raises(ValueError, match="dp_rank"):
        BlankInfillCollator(BlankInfillConfig(), SPECIAL, dp_rank=2, dp_world=2)
    with pytest.raises(ValueError, match="CLS"):
        collator().build([[11, 12, 13, 14]], random.Random(0))
    assert BlankInfillConfig(bert_prob=0.3).for_objective("sentence").gap_sentence_prob == 1.0


# ---- packing ------------------------------------------------------------------------------------------------


def test_packing_layout_and_determinism():
    r = np.random.default_rng(1)
    docs = [np.where(r.random(n) < 0.1, DOT, r.integers(10, 500, n)) for n in (5, 30, 90, 700, 2000)]
    ds = PackedDataset(docs, 128, SPECIAL, seed=3, sentence_end_ids=[DOT])
    raw = [d.astype(np.int64).tobytes() for d in docs]
    assert len(ds) == 5000
    picks = np.zeros(len(docs))
    for i in range(400):
        s = ds[i]
        assert np.array_equal(s, ds[i]) and s[0] == CLS and 64 <= len(s) <= 128
        # every [CLS] ... piece is a contiguous window of one document (followed by its eos when complete)
        for piece in np.split(s, np.flatnonzero(s == CLS)[1:]):
            body = (piece[1:-1] if piece[-1] == EOS else piece[1:]).tobytes()
            hits = [k for k, d in enumerate(raw) if d.find(body) % 8 == 0]  # found, at a token boundary
            assert hits
            picks[hits[0]] += 1
    assert not np.array_equal(ds[0], ds[1])
    assert not np.array_equal(ds[0], PackedDataset(docs, 128, SPECIAL, seed=4)[0])
    assert picks[-1] > picks[0]  # documents are drawn in proportion to their length
    with pytest.raises(IndexError):
        ds[5000]


def test_sentence_end_ids():
    vocab = {0: "[PAD]", 1: "hello", 2: ".", 3: "Mr.", 4: "\n", 5: "。", 6: "x"}
    assert sentence_end_ids(vocab.__getitem__, 7, exclude=[0]) == [2, 3, 4, 5]
