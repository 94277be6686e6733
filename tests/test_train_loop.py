import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmkit import GLM, GLMConfig
from glmkit.checkpoint import CheckpointError
from glmkit.train.loop import TrainArgs, batch_loss, blank_infill_loss, fit

from .helpers.synthetic import synthetic_source

ROOT = Path(__file__).resolve().parents[1]


def _config():
    return GLMConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=96, max_sequence_length=48)


def _args(tmp_path, **kw):
    base = dict(
        out_dir=str(tmp_path),
        max_steps=6,
        decay_iters=6,
        micro_batch_size=2,
        lr=3e-3,
        warmup=0.1,
        eval_every=3,
        save_every=3,
        log_every=1,
        progress=False,
        precision="fp32",
    )
    return TrainArgs(**{**base, **kw})


def _model(seed=0):
    torch.manual_seed(seed)
    return GLM(_config())


def test_loss_goes_down_and_artifacts_written(tmp_path):
    src = synthetic_source()
    hist = fit(
        _model(),
        _args(tmp_path, max_steps=30, decay_iters=None, eval_every=10, save_every=10),
        lambda i: src(i % 2),
        {"bert": lambda i: src(i % 2)},
    )
    assert sum(hist.losses[-5:]) / 5 < 0.8 * sum(hist.losses[:5]) / 5
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/bert" in r for r in records) and any("tok_per_s" in r for r in records)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    ckpt = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert GLM.from_pretrained(ckpt).config == _config()  # the checkpoint is a normal hub-layout model
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def test_resume_reproduces_uninterrupted_run(tmp_path):
    src = synthetic_source()
    full = fit(_model(), _args(tmp_path / "a"), src)
    first = fit(_model(), _args(tmp_path / "b", max_steps=3), src)
    second = fit(_model(seed=99), _args(tmp_path / "b"), src)  # weights come from the checkpoint, not the seed
    assert first.losses + second.losses == full.losses


def test_bf16_autocast_and_activation_checkpointing_train(tmp_path):
    hist = fit(
        _model(), _args(tmp_path, precision="bf16", activation_checkpointing=True, max_steps=2), synthetic_source()
    )
    assert len(hist.losses) == 2 and all(torch.isfinite(torch.tensor(hist.losses)))


def test_corrupt_checkpoint_is_a_clear_error_and_left_intact(tmp_path):
    src = synthetic_source()
    fit(_model(), _args(tmp_path, max_steps=3), src)
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot resume from .*step-00000003"):
        fit(_model(), _args(tmp_path), src)
    assert (ckpt / "model.safetensors").stat().st_size == len(data) // 2


def test_killed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    src = synthetic_source()
    fit(_model(), _args(tmp_path, max_steps=3), src)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if "training_state" in str(f):
            raise KeyboardInterrupt("killed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), _args(tmp_path), src)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    assert not (tmp_path / "checkpoints" / "step-00000006").exists()


def test_bad_args_are_named():
    with pytest.raises(ValueError, match="max_steps"):
        TrainArgs(max_steps=0)
    with pytest.raises(ValueError, match="precision"):
        TrainArgs(precision="fp8")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_same_global_batch(tmp_path, parallel):
    """torchrun 2 ranks × grad_accum 1 vs 1 process × grad_accum 2: the same global batch, the same losses.

    Under FSDP each rank holds only its shard of every parameter between steps, and the gathered checkpoint is
    exactly the two shards put together; under either engine it loads into one process with the weights of the
    one-process run.
    """
    script = ROOT / "tests" / "helpers" / "ddp_run.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(script), str(tmp_path / "s"), "2", str(single)], check=True, env=env)
    multi = tmp_path / "multi.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={29533 + (parallel == 'fsdp')}",
        str(script),
        str(tmp_path / "m"),
        "1",
        str(multi),
        parallel,
    ]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert len(a) == len(b) == 4
    # identical data and math; only the order of the gradient sum differs (all-reduce vs accumulation), which
    # Adam's per-parameter normalisation amplifies to ~1e-5 relative after the first update
    assert abs(a[0] - b[0]) < 1e-6
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=3e-4)

    held = [json.loads((tmp_path / "m" / f"rank-{r}.json").read_text()) for r in range(2)]
    full = held[0]["full_numel"]
    assert all(len(h["held_numel"]) == 4 for h in held)
    if parallel == "fsdp":  # after every step each rank keeps its own half of the elements and nothing more
        for step in range(4):
            assert held[0]["held_numel"][step] + held[1]["held_numel"][step] == full
            assert all(h["held_numel"][step] <= full // 2 + 2 * 64 for h in held)  # dim-0 halves of ~30 tensors
    else:
        assert all(n == full for h in held for n in h["held_numel"])

    # the gathered checkpoint is a normal hub-layout model, loadable by one process
    reloaded = GLM.from_pretrained(tmp_path / "m" / "checkpoints" / "step-00000004").state_dict()
    shards = [torch.load(tmp_path / "m" / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    for name, part in shards[0].items():
        whole = torch.cat([part, shards[1][name]]) if parallel == "fsdp" else part
        torch.testing.assert_close(reloaded[name], whole, rtol=0, atol=0, msg=name)
    one_process = GLM.from_pretrained(tmp_path / "s" / "checkpoints" / "step-00000004").state_dict()
    assert reloaded.keys() == one_process.keys()
    for name, w in one_process.items():  # only the order of gradient sums differs (see the losses)
        torch.testing.assert_close(reloaded[name], w, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_on_part_b_only_equals_full_logits_loss():
    model = _model().eval()
    b = synthetic_source(batch=3)(0)
    full = blank_infill_loss(
        model(b["input_ids"], b["position_ids"], b["attention_mask"]), b["targets"], b["loss_mask"]
    )
    torch.testing.assert_close(batch_loss(model, b), full, atol=1e-6, rtol=1e-6)
    keep = b["loss_mask"] > 0
    logits = model(b["input_ids"], b["position_ids"], b["attention_mask"], logits_mask=keep)
    torch.testing.assert_close(logits, model(b["input_ids"], b["position_ids"], b["attention_mask"])[keep])


def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    """The wiring of ``compile=True`` (checkpoints keep plain names); the eager backend keeps the test fast."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    src = synthetic_source()
    eager = fit(_model(), _args(tmp_path / "e", max_steps=2), src)
    compiled = fit(_model(), _args(tmp_path / "c", max_steps=2, compile=True), src)
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-4)
    assert GLM.from_pretrained(tmp_path / "c" / "checkpoints" / "step-00000002").config == _config()
