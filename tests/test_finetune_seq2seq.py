"""Seq2seq fine-tuning: the layout against a hand-built one, label smoothing against its formula, truncation,
learning through the one training loop, and bad rows."""

import pytest
import torch

from glmkit import GLM, GLMConfig
from glmkit.finetune import DataError, FinetuneArgs, Seq2SeqTask, evaluate_task, finetune
from glmkit.tokenizer import WhitespaceTokenizer
from glmkit.train.loop import TrainArgs, batch_loss

CLS, MASK, EOS, SOP, EOP, GMASK, SMASK = 3, 4, 0, 1, 2, 7, 8
WORDS = "a b c d e x y z".split()


def _tok():
    return WhitespaceTokenizer(WORDS)  # a=9 ... e=13, x=14, y=15, z=16


def _ids(text):
    return [9 + WORDS.index(w) for w in text.split()]


def _model(seed=0):
    torch.manual_seed(seed)
    return GLM(GLMConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=32, max_sequence_length=48))


def test_layout_of_a_source_with_a_blank_equals_the_reference_layout():
    (item,) = Seq2SeqTask().prepare(_tok(), [{"source": "a [sMASK] b", "target": "x y"}], train=True)
    s = item.sample
    # [CLS] a [sMASK] b [eos] | <sop> x y -> x y <eop>, Part B at the blank's position 2, blocks 1..3
    assert s.tokens == [CLS, *_ids("a"), SMASK, *_ids("b"), EOS, SOP, *_ids("x y")]
    assert s.targets[5:] == [*_ids("x y"), EOP] and s.loss_mask == [0] * 5 + [1] * 3
    assert s.position_ids == [0, 1, 2, 3, 4, 2, 2, 2] and s.block_position_ids == [0] * 5 + [1, 2, 3]
    assert s.sep == 5


def test_a_source_without_a_blank_is_continued_at_gmask_and_a_template_places_it():
    (item,) = Seq2SeqTask().prepare(_tok(), [{"source": "a b", "target": "x"}], train=True)
    assert item.sample.tokens == [CLS, *_ids("a b"), GMASK, SOP, *_ids("x")]  # what `glmkit generate` continues
    assert item.sample.position_ids == [0, 1, 2, 3, 3, 3]
    task = Seq2SeqTask(template="[MASK] c {source}")  # GLM's summarization form: the blank first
    (item,) = task.prepare(_tok(), [{"source": "a b", "target": "x"}], train=True)
    assert item.sample.tokens == [CLS, MASK, *_ids("c a b"), EOS, SOP, *_ids("x")]
    assert item.sample.position_ids[-2:] == [1, 1]


def test_truncation_keeps_the_blank_and_the_eop():
    task = Seq2SeqTask(max_source_length=5, max_target_length=3)
    (item,) = task.prepare(_tok(), [{"source": "a [MASK] b c d e", "target": "x y z"}], train=True)
    assert item.sample.tokens[: item.sample.sep] == [CLS, *_ids("a"), MASK, *_ids("b"), EOS]
    assert item.sample.targets[item.sample.sep :] == [*_ids("x y"), EOP]
    (item,) = task.prepare(
        _tok(), [{"source": "a b c d e", "target": "x"}], train=True
    )  # continued: cut before [gMASK]
    assert item.sample.tokens[: item.sample.sep] == [CLS, *_ids("a b c"), GMASK]


def test_label_smoothed_loss_is_the_reference_formula():
    model, eps = _model().eval(), 0.1
    task = Seq2SeqTask(label_smoothing=eps)
    rows = [{"source": "a [MASK] b c", "target": "x y z"}, {"source": "d", "target": "y"}]
    batch = task.collate(task.prepare(_tok(), rows, train=True))
    logits = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    logp = torch.log_softmax(logits.float(), -1)
    keep = batch["loss_mask"] > 0
    nll = -logp.gather(-1, batch["targets"][..., None])[..., 0][keep]
    smooth = -logp.mean(-1)[keep]
    want = ((1 - eps) * nll + eps * smooth).mean()  # (1-ε)·CE + ε·mean_v(-log p), averaged over the targets
    torch.testing.assert_close(task.loss(model, batch), want, rtol=1e-5, atol=1e-6)
    # without smoothing it is exactly the pretraining loss on the same batch
    torch.testing.assert_close(Seq2SeqTask().loss(model, batch), batch_loss(model, batch), rtol=1e-6, atol=1e-7)


def test_seq2seq_fine_tuning_learns_a_mapping(tmp_path):
    swap = {"a": "x", "b": "y", "c": "z"}
    rows = [{"source": f"{s} {t} [MASK]", "target": f"{swap[s]} {swap[t]}"} for s in swap for t in swap]
    task, tok, model = Seq2SeqTask(label_smoothing=0.1), _tok(), _model(1)
    before = evaluate_task(model, tok, task, rows)
    args = FinetuneArgs(
        train=TrainArgs(
            out_dir=str(tmp_path), micro_batch_size=9, lr=5e-3, warmup=0.1, eval_every=20, save_every=20,
            precision="fp32", progress=False, best_metric="loss", best_mode="min",
        ),
        epochs=80,
    )  # fmt: skip
    hist = finetune(model, tok, task, rows, rows, args)
    after = evaluate_task(model, tok, task, rows)
    assert len(hist.losses) == 80  # 9 rows, batch 9: one step an epoch
    assert after["loss"] < 0.3 * before["loss"] and after["token_accuracy"] > max(0.8, before["token_accuracy"])
    assert hist.best["value"] == min(e["loss"] for e in hist.evals)
    assert GLM.from_pretrained(tmp_path / "best").config == model.config


def test_bad_rows_are_named_by_line():
    rows = [
        {"source": "a", "target": "x"},
        {"source": "a", "target": 3},
        {"source": "a [MASK] b [MASK]", "target": "x"},
    ]
    with pytest.raises(DataError, match=r"line 2: 'source' and 'target' must be strings"):
        Seq2SeqTask().prepare(_tok(), rows, train=True)
    with pytest.warns(UserWarning) as caught:
        assert len(Seq2SeqTask().prepare(_tok(), rows, train=True, on_error="skip")) == 1
    assert "line 3: the source has 2 blanks" in str(caught[1].message)
    with pytest.raises(DataError, match="line 1: missing field 'source'"):
        Seq2SeqTask().prepare(_tok(), [{"text": "a"}], train=True)
    with pytest.raises(ValueError, match="label_smoothing"):
        Seq2SeqTask(label_smoothing=1.0)
    with pytest.raises(ValueError, match="no {source} placeholder"):
        Seq2SeqTask(template="[MASK] Content:")
