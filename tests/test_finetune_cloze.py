"""Cloze fine-tuning: the layout against a hand-built one, both scorers against independent computations, learning,
model selection with early stopping, exact resume, and the best checkpoint loading as a normal model."""

import json

import pytest
import torch

from glmkit import GLM, GLMConfig
from glmkit.finetune import BLANK, ClozeTask, FinetuneArgs, evaluate_task, finetune, shortenable
from glmkit.finetune.cloze import collate_features, span_scores, verbalizer_logits
from glmkit.kv_cache import KVCache
from glmkit.tokenizer import WhitespaceTokenizer
from glmkit.train.loop import TrainArgs, fit

CLS, MASK, EOS, SOP, EOP = 3, 4, 0, 1, 2
WORDS = "a b c d e f yes no maybe way".split()


def _tok():
    return WhitespaceTokenizer(WORDS)  # a=9, b=10, ..., yes=15, no=16, maybe=17, way=18


def _ids(text):
    return [9 + WORDS.index(w) for w in text.split()]


def _model(seed=0, vocab=32):
    torch.manual_seed(seed)
    return GLM(GLMConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, max_sequence_length=48)).eval()


def _task(**kw):
    base = dict(name="toy", pattern=lambda r: [r["text"], BLANK, "f"], verbalizer={"y": "yes", "n": "no"})
    return ClozeTask(**{**base, **kw})


def test_single_token_layout_equals_the_reference_layout():
    task = _task()
    (item,) = task.prepare(_tok(), [{"text": "a b c", "label": "n"}], train=True)
    (s,) = item.samples
    # [CLS] a b c [MASK] f [eos] | <sop>: Part A bidirectional, <sop> at the blank's position 4, block 1
    assert s.tokens == [CLS, *_ids("a b c"), MASK, *_ids("f"), EOS, SOP]
    assert s.position_ids == [0, 1, 2, 3, 4, 5, 6, 4]
    assert s.block_position_ids == [0] * 7 + [1]
    assert s.sep == 7 and s.loss_mask == [0] * 7 + [1]
    assert item.choice_ids == _ids("yes no") and item.label == 1
    batch = collate_features([item])
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    assert torch.equal(batch["attention_mask"][0, 0], (j < 7) | (j <= i))


def test_span_layout_equals_the_reference_layout_and_a_final_blank_keeps_eos():
    task = _task(pattern=lambda r: [r["text"], BLANK], verbalizer={"y": "yes", "n": "no way"}, multi_token=True)
    (item,) = task.prepare(_tok(), [{"text": "a b", "label": "y"}], train=False)
    yes, no_way = item.samples
    # Part A ends in eos even after a final blank (the fine-tuning layout), then <sop> answer -> answer <eop>
    assert no_way.tokens == [CLS, *_ids("a b"), MASK, EOS, SOP, *_ids("no way")]
    assert no_way.targets[5:] == [*_ids("no way"), EOP]
    assert no_way.position_ids == [0, 1, 2, 3, 4, 3, 3, 3]
    assert no_way.block_position_ids == [0] * 5 + [1, 2, 3]
    assert no_way.loss_mask == [0] * 5 + [1] * 3 and no_way.sep == 5
    assert yes.tokens == [CLS, *_ids("a b"), MASK, EOS, SOP, *_ids("yes")] and yes.targets[5:] == [*_ids("yes"), EOP]


def test_truncation_cuts_shortenable_text_from_the_side_with_more_of_it():
    task = ClozeTask(
        "t",
        lambda r: ([shortenable("a b c d"), "e"], [BLANK, shortenable("f a")]),
        verbalizer={"y": "yes"},
        max_length=9,
    )
    (item,) = task.prepare(_tok(), [{"label": "y"}], train=True)
    # 4 + 1 + 1 + 2 tokens + [CLS] [eos] <sop> = 11 > 9: two tokens go, both from part A's longer shortenable text
    assert item.samples[0].tokens == [CLS, *_ids("a b e"), MASK, *_ids("f a"), EOS, SOP]
    too_tight = ClozeTask("t", lambda r: ["a b c", BLANK], verbalizer={"y": "yes"}, max_length=5)
    with pytest.raises(ValueError, match="line 1: longer than max_length=5"):
        too_tight.prepare(_tok(), [{"label": "y"}], train=True)


def test_single_token_scores_are_the_logits_at_sop_and_the_loss_their_cross_entropy():
    model, tok, task = _model(), _tok(), _task()
    rows = [{"text": "a b c d e", "label": "y"}, {"text": "c", "label": "n"}]
    items = task.prepare(tok, rows, train=True)
    batch = collate_features(items)  # two lengths: the short row is padded
    got = verbalizer_logits(model, batch)
    want = []
    for it in items:  # each row alone, unpadded, full logits, by hand
        s = it.samples[0]
        pos = torch.tensor([[s.position_ids, s.block_position_ids]])
        logits = model(torch.tensor([s.tokens]), pos, s.sep)[0, s.sep]
        want.append(logits[_ids("yes no")])
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
    logp = torch.log_softmax(torch.stack(want), dim=-1)
    torch.testing.assert_close(task.loss(model, batch), -(logp[0, 0] + logp[1, 1]) / 2, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def _stepwise_logprob(model, sample):
    """Σ log p of a sample's Part-B targets, decoding one token at a time through the KV cache after Part A."""
    sep = sample.sep
    cache = KVCache.for_model(model, 1, len(sample) + 1)
    pos_a = torch.tensor([[sample.position_ids[:sep], sample.block_position_ids[:sep]]])
    model(torch.tensor([sample.tokens[:sep]]), pos_a, sep, cache)
    total = 0.0
    for t in range(sep, len(sample)):
        pos = torch.tensor([[[sample.position_ids[t]], [sample.block_position_ids[t]]]])
        logits = model(torch.tensor([[sample.tokens[t]]]), pos, 0, cache)[0, -1]
        total += float(torch.log_softmax(logits.double(), -1)[sample.targets[t]])
    return total


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_span_score_is_the_sum_of_stepwise_log_probs_including_eop(length_penalty):
    model, tok = _model(1), _tok()
    verbalizer = {"y": "yes", "n": "no way", "m": "maybe a b"}
    task = _task(verbalizer=verbalizer, multi_token=True, length_penalty=length_penalty)
    items = task.prepare(tok, [{"text": "a b c d", "label": "y"}, {"text": "e", "label": "m"}], train=True)
    batch = collate_features(items)
    scores, _ = span_scores(model, batch, length_penalty)
    samples = [s for it in items for s in it.samples]
    want = [_stepwise_logprob(model, s) / (sum(s.loss_mask) ** length_penalty) for s in samples]
    torch.testing.assert_close(scores.double(), torch.tensor(want, dtype=torch.double), rtol=1e-5, atol=1e-5)
    # the loss is the cross-entropy over each example's candidates
    by_ex = torch.tensor(want).view(2, 3)
    ce = -(torch.log_softmax(by_ex, -1)[0, 0] + torch.log_softmax(by_ex, -1)[1, 2]) / 2
    torch.testing.assert_close(task.loss(model, batch), ce.float(), rtol=1e-4, atol=1e-5)


def test_a_multi_token_verbalizer_word_is_named_unless_spans_are_scored():
    task = _task(verbalizer={"y": "yes", "n": "no way"})
    with pytest.raises(ValueError, match="verbalizer word 'no way' .* multi_token=True"):
        task.prepare(_tok(), [{"text": "a", "label": "y"}], train=True)


def test_a_label_the_verbalizer_lacks_is_named_with_its_line():
    rows = [{"text": "a", "label": "y"}, {"text": "b", "label": "y"}, {"text": "c", "label": "perhaps"}]
    with pytest.raises(ValueError, match=r"line 3: label 'perhaps' is not in the verbalizer of task toy"):
        _task().prepare(_tok(), rows, train=True)
    with pytest.warns(UserWarning, match="line 3"):
        assert len(_task().prepare(_tok(), rows, train=True, on_error="skip")) == 2


# ---- learning --------------------------------------------------------------------------------------------------

NOUNS = "lamp door gate tap fire light oven radio engine fan stove bell".split()
LAMP_WORDS = [*NOUNS, *"the is on off . is it ? answer: yes no way".split()]


def _lamp_rows(nouns):
    return [{"text": f"the {n} is {state} .", "label": state} for n in nouns for state in ("on", "off")]


def _lamp_task(multi_token=False, yes="yes", no="no"):
    return ClozeTask(
        "lamp",
        lambda r: [shortenable(r["text"]), "is it on ? answer:", BLANK, "."],
        verbalizer={"on": yes, "off": no},
        multi_token=multi_token,
        max_length=32,
    )


def _lamp_args(out, **kw):
    base = dict(
        out_dir=str(out), max_steps=40, micro_batch_size=8, lr=3e-3, warmup=0.1, decay_style="linear",
        decay_ratio=0.0, eval_every=10, save_every=10, precision="fp32", progress=False, best_metric="accuracy",
    )  # fmt: skip
    return FinetuneArgs(train=TrainArgs(**{**base, **kw}))


@pytest.mark.parametrize("multi_token", [False, True])
def test_cloze_fine_tuning_lowers_the_loss_and_raises_accuracy(tmp_path, multi_token):
    tok = WhitespaceTokenizer(LAMP_WORDS)
    model = _model(3, vocab=64)
    task = _lamp_task(multi_token, *(("yes way", "no way") if multi_token else ("yes", "no")))
    train, held_out = _lamp_rows(NOUNS[:8]), _lamp_rows(NOUNS[8:])  # held-out rows name objects never trained on
    before = evaluate_task(model, tok, task, held_out)
    hist = finetune(model, tok, task, train, held_out, _lamp_args(tmp_path))
    after = evaluate_task(model, tok, task, held_out)
    assert sum(hist.losses[-5:]) / 5 < 0.6 * sum(hist.losses[:5]) / 5
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"] and after["accuracy"] >= 0.75
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == hist.best["step"] and best["accuracy"] == hist.best["value"] == max(
        e["accuracy"] for e in hist.evals
    )


def test_the_best_checkpoint_of_the_bundled_model_loads_and_generates(tmp_path):
    """``out/best`` is a model folder with its tokenizer: what ``glmkit generate`` and ``serve`` load."""
    from glmkit.bundled import load_model_and_tokenizer
    from glmkit.generate.cli import generate_text

    model, tok = load_model_and_tokenizer()
    task = _lamp_task(yes=" true", no=" false")
    rows = [{"text": f"The {n} is {s}.", "label": s} for n in ("lamp", "door") for s in ("on", "off")]
    hist = finetune(model, tok, task, rows, rows, _lamp_args(tmp_path, max_steps=2, eval_every=1, micro_batch_size=4))
    reloaded, tok2 = load_model_and_tokenizer(tmp_path / "best")
    assert evaluate_task(reloaded, tok2, task, rows)["accuracy"] == hist.best["value"]
    (out,) = generate_text(reloaded, tok2, "The lamp is on. Is it on? Answer:[MASK].", max_new_tokens=2)
    assert isinstance(out.text, str)


# ---- model selection in the loop ------------------------------------------------------------------------------


def _toy_rows(n=8):
    words = "a b c d e".split()
    return [{"text": f"{words[i % 5]} {words[(i * 2) % 5]}", "label": "y" if i % 2 else "n"} for i in range(n)]


def _toy_args(out, **kw):
    base = dict(
        out_dir=str(out), max_steps=6, decay_iters=6, micro_batch_size=3, lr=3e-3, warmup=0.1, eval_every=2,
        save_every=2, precision="fp32", progress=False, best_metric="accuracy",
    )  # fmt: skip
    return FinetuneArgs(train=TrainArgs(**{**base, **kw}))


def test_resumed_fine_tuning_equals_the_uninterrupted_run(tmp_path):
    task, tok = _task(), _tok()
    full = finetune(_model(), tok, task, _toy_rows(), _toy_rows(4), _toy_args(tmp_path / "a"))
    first = finetune(_model(), tok, task, _toy_rows(), _toy_rows(4), _toy_args(tmp_path / "b", max_steps=4))
    second = finetune(_model(7), tok, task, _toy_rows(), _toy_rows(4), _toy_args(tmp_path / "b"))
    assert first.losses + second.losses == full.losses
    assert first.evals + second.evals == full.evals and second.best == full.best
    a, b = (GLM.from_pretrained(tmp_path / p / "best").state_dict() for p in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_stops_keeps_the_best_and_stays_stopped(tmp_path):
    from .helpers.synthetic import synthetic_source

    script = iter([0.5, 0.7, 0.6, 0.7, 0.9, 0.9])  # best at the 2nd evaluation, then 2 without: stop after the 4th
    args = TrainArgs(
        out_dir=str(tmp_path), max_steps=12, eval_every=2, save_every=100, lr=1e-3, precision="fp32",
        progress=False, best_metric="accuracy", patience=2, micro_batch_size=2,
    )  # fmt: skip
    model = GLM(GLMConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=96, max_sequence_length=48))
    hist = fit(model, args, synthetic_source(), metric_fn=lambda m: {"accuracy": next(script)})
    assert hist.stopped_early and len(hist.losses) == 8 and [e["step"] for e in hist.evals] == [2, 4, 6, 8]
    assert hist.best["step"] == 4 and hist.best["value"] == 0.7
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 4
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000008"
    again = fit(model, args, synthetic_source(), metric_fn=lambda m: {"accuracy": 1.0})
    assert again.stopped_early and again.losses == [] and again.best["step"] == 4


def test_selection_arguments_are_checked(tmp_path):
    from .helpers.synthetic import synthetic_source

    with pytest.raises(ValueError, match="patience: early stopping needs best_metric"):
        TrainArgs(patience=3)
    with pytest.raises(ValueError, match="best_mode"):
        TrainArgs(best_metric="loss", best_mode="lowest")
    args = TrainArgs(
        out_dir=str(tmp_path), max_steps=1, eval_every=1, best_metric="f1", progress=False, precision="fp32"
    )
    with pytest.raises(ValueError, match=r"best_metric: 'f1' is not an evaluation result; there are \['accuracy'\]"):
        fit(_model(vocab=96), args, synthetic_source(), metric_fn=lambda m: {"accuracy": 1.0})
