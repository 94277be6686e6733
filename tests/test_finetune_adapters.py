"""LoRA and P-tuning v2 through the one training loop: checkpoints hold the trainable tensors only and resume
exactly; ``out/best`` is peft's adapter folder (plus, with ``merge_lora``, the merged model) or the P-tuning layout,
each reloading to the trained model's logits."""

import pytest
import torch
from safetensors.torch import load_file

from glmkit import GLM, GLMConfig
from glmkit.checkpoint import CheckpointError
from glmkit.finetune import BLANK, ClozeTask, FinetuneArgs, finetune
from glmkit.finetune.peft import add_lora, add_prefix, load_adapter, load_prefix
from glmkit.tokenizer import WhitespaceTokenizer
from glmkit.train.loop import TrainArgs
from glmkit.train.state import MODULE_STATE

WORDS = "a b c d e f yes no maybe way".split()


def _base(seed=0):
    torch.manual_seed(seed)
    return GLM(GLMConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=32, max_sequence_length=48)).eval()


def _task():
    return ClozeTask("toy", lambda r: [r["text"], BLANK, "f"], verbalizer={"y": "yes", "n": "no"})


def _rows(n=8):
    w = "a b c d e".split()
    return [{"text": f"{w[i % 5]} {w[(i * 2) % 5]}", "label": "y" if i % 2 else "n"} for i in range(n)]


def _args(out, **kw):
    base = dict(
        out_dir=str(out), max_steps=6, decay_iters=6, micro_batch_size=3, lr=3e-2, warmup=0.1, eval_every=2,
        save_every=2, precision="fp32", progress=False, best_metric="loss", best_mode="min",
    )  # fmt: skip
    return FinetuneArgs(train=TrainArgs(**{**base, **kw}))


def _logits(model, tok):
    batch = _task().collate(_task().prepare(tok, _rows(4), train=False))
    with torch.no_grad():
        return model.eval()(batch["input_ids"], batch["position_ids"], batch["attention_mask"])


def _run(method, out, seed=0, **kw):
    tok = WhitespaceTokenizer(WORDS)
    base = _base()
    torch.manual_seed(seed)  # the adapters' init: a resumed run must take the saved ones instead
    model = add_lora(base, r=4) if method == "lora" else add_prefix(base, 3)
    hist = finetune(model, tok, _task(), _rows(), _rows(4), _args(out, **kw))
    return model, tok, hist


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_an_adapter_run_resumes_exactly_from_checkpoints_holding_only_the_trainable_tensors(tmp_path, method):
    full_model, tok, full = _run(method, tmp_path / "a")
    _, _, first = _run(method, tmp_path / "b", max_steps=4)
    resumed_model, _, second = _run(method, tmp_path / "b", seed=7)
    assert first.losses + second.losses == full.losses and len(full.losses) == 6
    assert first.evals + second.evals == full.evals and second.best == full.best
    assert torch.equal(_logits(full_model, tok), _logits(resumed_model, tok))
    step = tmp_path / "a" / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in step.iterdir()) == [MODULE_STATE, "training_state.pt"]
    saved = torch.load(step / MODULE_STATE, weights_only=True)
    trainable = {n for n, p in full_model.named_parameters() if p.requires_grad}
    assert saved["layout"] == method and set(saved["state"]) == trainable
    assert all(("lora_" in n) if method == "lora" else n.startswith("prefix_encoder.") for n in trainable)


def test_the_best_lora_folder_is_peft_s_adapter_and_the_merged_model_beside_it(tmp_path):
    model, tok, hist = _run("lora", tmp_path, merge_lora=True, eval_every=6)  # one evaluation: best = last
    best = tmp_path / "best"
    assert {"adapter_config.json", "adapter_model.safetensors", "best.json", "whitespace_vocab.json"} <= {
        p.name for p in best.iterdir()
    }
    assert all("lora_" in k for k in load_file(best / "adapter_model.safetensors"))
    trained = _logits(model, tok)
    assert hist.best["step"] == 6
    reloaded = load_adapter(_base(), best)
    assert torch.allclose(_logits(reloaded, tok), trained, atol=1e-5)
    merged = GLM.from_pretrained(best / "merged")
    assert torch.allclose(_logits(merged, tok), trained, atol=1e-4)
    assert (best / "merged" / "whitespace_vocab.json").is_file()


def test_the_best_prefix_folder_is_the_p_tuning_layout_and_reloads_to_the_same_logits(tmp_path):
    model, tok, hist = _run("prefix", tmp_path, eval_every=6)
    best = tmp_path / "best"
    assert hist.best["step"] == 6
    assert set(load_file(best / "model.safetensors")) == {"transformer.prefix_encoder.embedding.weight"}
    reloaded = load_prefix(_base(), best)
    assert torch.equal(_logits(reloaded, tok), _logits(model, tok))


def test_a_checkpoint_of_another_kind_of_run_is_refused_by_name(tmp_path):
    _run("lora", tmp_path, max_steps=2)
    tok = WhitespaceTokenizer(WORDS)
    with pytest.raises(CheckpointError, match="holds a lora run's weights, but the model is a plain one"):
        finetune(_base(), tok, _task(), _rows(), _rows(4), _args(tmp_path))
    with pytest.raises(CheckpointError, match="holds a lora run's weights, but the model is 'prefix'"):
        finetune(add_prefix(_base(), 3), tok, _task(), _rows(), _rows(4), _args(tmp_path))


def test_merge_lora_needs_lora_adapters(tmp_path):
    with pytest.raises(ValueError, match="merge_lora: the model has no LoRA adapters"):
        _run("prefix", tmp_path, merge_lora=True)
