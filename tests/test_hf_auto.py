"""glmkit under transformers' Auto classes (glmkit.hf): ``import glmkit`` registers a model type of its own, and
AutoTokenizer / AutoModel / AutoModelForCausalLM / AutoModelForSequenceClassification / AutoModelForMultipleChoice
read the bundled model and a tiny random GLM saved by glmkit; padding never changes a row's result."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    pipeline,
)

import glmkit
from glmkit.bundled import BUNDLED_MODEL
from glmkit.generate import generate
from glmkit.hf import GLMForSequenceClassification, GLMHFConfig, GLMTokenizerFast
from glmkit.masks import prefix_lm_mask
from glmkit.prompts import continuation_ids, infilling_ids
from glmkit.tokenizer import GLMTokenizer

TEXTS = ["I love this.", "This is a much longer sentence, and it goes on for a while.", "Fine", "No [MASK] here."]
FP32 = dict(dtype=torch.float32)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(BUNDLED_MODEL, num_labels=3, **FP32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random learned-position GLM and the bundled tokenizer, both saved by glmkit's own writers."""
    folder = tmp_path_factory.mktemp("tiny")
    special = GLMTokenizer.from_pretrained(BUNDLED_MODEL).special
    torch.manual_seed(1)
    glm = glmkit.GLM(glmkit.GLMConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=8192, special_tokens=special))
    glm.save_pretrained(folder)
    GLMTokenizer.from_pretrained(BUNDLED_MODEL).save_pretrained(folder)
    return folder, glm.eval()


def test_import_registers_a_model_type_that_does_not_replace_transformers_glm(tiny):
    from transformers import GlmConfig

    assert type(AutoConfig.for_model("glmkit_glm")) is GLMHFConfig
    assert type(AutoConfig.for_model("glm")) is GlmConfig  # GLM-4 is left alone
    assert json.loads((BUNDLED_MODEL / "config.json").read_text())["model_type"] == "glmkit_glm"
    assert json.loads((tiny[0] / "config.json").read_text())["model_type"] == "glmkit_glm"  # glmkit's writer
    assert type(AutoConfig.from_pretrained(tiny[0])) is GLMHFConfig


def test_an_old_checkpoint_that_says_glm_still_loads(tmp_path, tiny):
    """glmkit's loader reads a "glm" folder; under the Auto classes it loads with the config read as glmkit's."""
    folder, glm = tiny
    config = json.loads((folder / "config.json").read_text()) | {"model_type": "glm"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    old = glmkit.GLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), glm.state_dict().values(), strict=True))
    hf = AutoModel.from_pretrained(tmp_path, config=GLMHFConfig.from_pretrained(tmp_path))
    assert torch.equal(hf.glm.blocks[1].attn.qkv.weight, glm.blocks[1].attn.qkv.weight)


def test_the_issue_example_runs(tok, classifier):
    inputs = tok(TEXTS[:2], padding=True, truncation=True, return_tensors="pt")
    logits = classifier(**inputs).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert isinstance(tok, GLMTokenizerFast) and tok.model_max_length == 256
    for row, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), strict=True):
        real = [t for t, m in zip(row, mask, strict=True) if m]
        assert real[0] == tok.cls_token_id and real[-1] == tok.eos_token_id  # [CLS] text <eos>, the reference input
    ours = GLMTokenizer.from_pretrained(BUNDLED_MODEL)
    assert real[1:-1] == ours.encode(TEXTS[1])  # the same pieces as glmkit's own tokenizer


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_a_rows_logits(tok, classifier, side):
    tok.padding_side = side
    try:
        batch = tok(TEXTS, padding="max_length", max_length=40, return_tensors="pt")
    finally:
        tok.padding_side = "left"
    assert (batch["attention_mask"] == 0).any(-1).all()  # every row is padded
    together = classifier(**batch).logits
    for i, text in enumerate(TEXTS):
        alone = classifier(**tok([text], return_tensors="pt")).logits
        torch.testing.assert_close(together[i : i + 1], alone, atol=2e-5, rtol=1e-5)


def test_classifier_pools_cls_through_the_reference_head(tok, classifier):
    """logits = out_proj(tanh(dense(h_[CLS]))) on the full bidirectional Part A (THUDM/GLM PoolingModel, eval)."""
    inputs = tok([TEXTS[1]], return_tensors="pt")
    glm = glmkit.GLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).eval()
    S = inputs["input_ids"].shape[1]
    positions = torch.stack([torch.arange(S), torch.zeros(S, dtype=torch.long)])[None]
    hidden = glm(inputs["input_ids"], positions, prefix_lm_mask(S, S), return_hidden=True)[:, 0]
    head = classifier.classifier
    expected = head.out_proj(torch.tanh(head.dense(hidden)))
    torch.testing.assert_close(classifier(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_classification_loss_and_fresh_head(tok, classifier):
    base = glmkit.GLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    assert torch.equal(classifier.glm.blocks[5].mlp.proj.weight, base.blocks[5].mlp.proj.weight)
    dense = classifier.classifier.dense
    assert not dense.bias.any() and 0.015 < float(dense.weight.detach().std()) < 0.025  # N(0, initializer_range), new
    inputs = tok(TEXTS, padding=True, return_tensors="pt")
    labels = torch.tensor([0, 2, 1, 2])
    out = classifier(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert classifier.classifier.out_proj.weight.grad.abs().sum() > 0 and classifier.glm.wte.weight.grad is not None
    classifier.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"labels: expected one class id in \[0, 3\)"):
        classifier(**inputs, labels=torch.tensor([0, 1, 2, 3]))


def test_regression_head_with_one_label(tok, tiny):
    model = AutoModelForSequenceClassification.from_pretrained(tiny[0], num_labels=1)
    inputs = tok(TEXTS[:2], padding=True, return_tensors="pt")
    out = model(**inputs, labels=torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, -1.0])))


def test_multiple_choice_scores_each_choice_row_and_softmaxes_over_them(tok):
    torch.manual_seed(0)
    model = AutoModelForMultipleChoice.from_pretrained(BUNDLED_MODEL, **FP32)
    context = ["The cat sat on the", "Paris is the capital of"]
    choices = [["mat.", "moon, far away from home."], ["France.", "a very long list of things."]]
    enc = tok([c for c in context for _ in range(2)], [x for row in choices for x in row], padding=True)
    batch = {k: torch.tensor(v).view(2, 2, -1) for k, v in enc.items()}
    labels = torch.tensor([0, 0])
    out = model(**batch, labels=labels)
    assert out.logits.shape == (2, 2)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    for b in range(2):
        for c in range(2):  # a choice alone (unpadded) scores as in the padded batch
            alone = tok([context[b]], [choices[b][c]], return_tensors="pt")
            score = model(input_ids=alone["input_ids"][None], attention_mask=alone["attention_mask"][None]).logits
            torch.testing.assert_close(score[0, 0], out.logits[b, c], atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"input_ids: expected shape \[batch, choices, length\]"):
        model(input_ids=batch["input_ids"][0])


@pytest.mark.parametrize("text", ["The capital of France is", "The [MASK] of France is Paris."])
def test_causal_lm_generate_gives_glmkits_tokens(tok, text):
    lm = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, **FP32)
    inputs = tok(
        [text, "A much longer prompt that makes the batch padded on the left"], return_tensors="pt", padding=True
    )
    out = lm.generate(**inputs, max_new_tokens=8, do_sample=False)
    glm = glmkit.GLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).eval()
    ours = GLMTokenizer.from_pretrained(BUNDLED_MODEL)
    prompt = (infilling_ids if "[MASK]" in text else continuation_ids)(ours, text)
    expected = generate(glm, prompt, special_tokens=ours.special, max_new_tokens=8)
    row = out[0].tolist()
    row = row[row.index(tok.cls_token_id) :]  # the left padding generate() added
    new = expected.new_tokens[0]
    assert row[: len(prompt) + 1] == [*prompt, ours.special.sop]  # the tokenizer's row, laid out as glmkit does
    assert row[len(prompt) + 1 : len(prompt) + 1 + len(new)] == new and len(new) >= 2


def test_save_and_reload_give_equal_logits_and_hub_names(tmp_path, tok, classifier):
    classifier.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "glmkit_glm" and len(config["id2label"]) == 3
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"glm.word_embeddings.weight", "glm.transformer.layers.0.attention.query_key_value.weight"} <= keys
    assert "classifier.out_proj.weight" in keys
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    inputs = tok(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(again(**inputs).logits, classifier(**inputs).logits)
    with pytest.raises(ValueError, match=r"num_labels=5, but .* trained for 3 labels"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    lm = glmkit.GLM.from_pretrained(tmp_path)  # glmkit reads the classifier's language model
    assert torch.equal(lm.blocks[2].attn.qkv.weight, classifier.glm.blocks[2].attn.qkv.weight)


def test_a_saved_causal_lm_loads_in_glmkit(tmp_path):
    lm = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL)
    lm.save_pretrained(tmp_path)
    glm = glmkit.GLM.from_pretrained(tmp_path)
    reference = glmkit.GLM.from_pretrained(BUNDLED_MODEL)
    for (name, a), b in zip(glm.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_tiny_glm_saved_by_glmkit_under_every_auto_class(tiny):
    folder, glm = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    assert isinstance(tok, GLMTokenizerFast) and tok.model_max_length == glm.config.max_sequence_length
    inputs = tok(TEXTS[:3], padding=True, return_tensors="pt")
    hidden = AutoModel.from_pretrained(folder)(**inputs).last_hidden_state
    ids = inputs["input_ids"][1:2]  # the longest row, unpadded
    S = ids.shape[1]
    positions = torch.stack([torch.arange(S), torch.zeros(S, dtype=torch.long)])[None]
    torch.testing.assert_close(hidden[1:2], glm(ids, positions, S, return_hidden=True), atol=1e-5, rtol=1e-5)
    for auto in (AutoModelForSequenceClassification, AutoModelForCausalLM):
        model = auto.from_pretrained(folder)
        assert torch.equal(model.glm.wpe.weight, glm.wpe.weight) and torch.equal(model.glm.wbpe.weight, glm.wbpe.weight)
    lm = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(lm(**inputs).logits[1:2], glm(ids, positions, S), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="labels: the generation wrapper computes no loss"):
        lm(**inputs, labels=inputs["input_ids"])


def test_text_classification_pipeline(tok, classifier):
    pipe = pipeline("text-classification", model=classifier, tokenizer=tok)
    out = pipe(TEXTS[:2])
    with torch.no_grad():
        probs = classifier(**tok(TEXTS[:2], padding=True, return_tensors="pt")).logits.softmax(-1)
    for row, p in zip(out, probs, strict=True):
        assert row["label"] == classifier.config.id2label[int(p.argmax())]
        assert row["score"] == pytest.approx(float(p.max()), abs=1e-5)


def test_from_glm_wraps_a_glmkit_model_for_a_training_loop():
    special = glmkit.SpecialTokens(eos=0, pad=0, cls=3, mask=4, sop=1, eop=2)
    glm = glmkit.GLM(glmkit.GLMConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64, special_tokens=special))
    model = GLMForSequenceClassification.from_glm(glm, num_labels=2)
    assert model.glm is glm
    ids = torch.tensor([[3, 10, 11, 0], [3, 12, 0, 0]])
    out = model(input_ids=ids, attention_mask=(ids != 0).long() | (torch.arange(4) == 0), labels=torch.tensor([1, 0]))
    out.loss.backward()
    assert glm.wte.weight.grad is not None and out.logits.shape == (2, 2)


def test_bad_input_is_named(tok, classifier):
    long = " ".join(["word"] * 400)
    ids = tok([long], return_tensors="pt")  # no truncation: longer than the context
    assert ids["input_ids"].shape[1] > 257
    with pytest.raises(ValueError, match=r"more than the model's context of 257 positions.*truncation=True"):
        classifier(**ids)
    cut = tok([long], truncation=True, return_tensors="pt")
    assert cut["input_ids"].shape[1] == 256 and cut["input_ids"][0, 0] == tok.cls_token_id
    assert torch.isfinite(classifier(**cut).logits).all()
    with pytest.raises(ValueError, match="attention_mask: a row has no token"):
        classifier(input_ids=cut["input_ids"], attention_mask=torch.zeros_like(cut["input_ids"]))


def test_a_folder_missing_model_weights_is_refused(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    folder = tiny[0]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = load_file(folder / "model.safetensors")
    del state["glm.transformer.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 weight\(s\) of the model are not in the checkpoint.*blocks\.1\.mlp\.proj"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)


def test_a_tokenizer_saved_by_transformers_loads_in_glmkit(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(again, GLMTokenizerFast) and again(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    ours, bundled = GLMTokenizer.from_pretrained(tmp_path), GLMTokenizer.from_pretrained(BUNDLED_MODEL)
    assert ours.special == bundled.special and ours.encode(TEXTS[1]) == bundled.encode(TEXTS[1])
