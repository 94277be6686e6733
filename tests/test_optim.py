import json
from pathlib import Path

import pytest
import torch

from glmkit.train.loop import TrainArgs
from glmkit.train.optim import AnnealingLR, annealed_lr, param_groups


def test_no_decay_on_layernorm_and_bias(tiny_model):
    decay, no_decay = param_groups(tiny_model, 0.1)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "norm" not in names[id(p)] for p in decay["params"])
    assert {"ln_f.weight", "blocks.0.norm_1.weight", "blocks.0.attn.qkv.bias"} <= {
        names[id(p)] for p in no_decay["params"]
    }
    assert any(names[id(p)] == "wte.weight" for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_wrapped_model_is_grouped_like_the_bare_one(tiny_model):
    """DDP names parameters ``module.…``: ln_f must still get no weight decay (it did not, before)."""
    wrapper = torch.nn.Module()
    wrapper.module = tiny_model
    bare = [{id(p) for p in g["params"]} for g in param_groups(tiny_model, 0.1)]
    assert [{id(p) for p in g["params"]} for g in param_groups(wrapper, 0.1)] == bare


REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "reference" / "annealing_lr.json").read_text())


def _id(case: dict) -> str:
    return "-".join(str(v) for k, v in case.items() if k not in ("via", "lr_at"))


STYLES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "exponential": "constant", None: "constant"}


def _sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


@pytest.mark.parametrize("case", [c for c in REFERENCE["cases"] if c["via"] == "AnnealingLR"], ids=_id)
def test_annealed_lr_equals_the_reference_class(case):
    """THUDM/GLM's AnnealingLR built with its own arguments: every style, with and without warmup, t past the end.

    Its progress is (t - warmup_iter) / num_iters, so at t = 1000 with warmup_iter 50 and num_iters 1000 the
    cosine is not yet at its floor (2.23e-5, not 2e-5), and linear falls past decay_ratio * lr, then below 0.
    """
    for t, want in case["lr_at"].items():
        got = annealed_lr(
            int(t),
            case["start_lr"],
            case["warmup_iter"],
            case["num_iters"],
            STYLES[case["decay_style"]],
            case["decay_ratio"],
        )
        assert got == pytest.approx(want, rel=1e-12, abs=1e-18), t


@pytest.mark.parametrize("case", [c for c in REFERENCE["cases"] if c["via"] == "get_learning_rate_scheduler"], ids=_id)
def test_annealing_lr_equals_the_reference_as_pretrain_glm_builds_it(case):
    """``AnnealingLR(lr, decay_iters, warmup, ...)`` is the reference built from --lr-decay-iters and --warmup
    (warmup_iter = warmup * decay_iters, num_iters = decay_iters - warmup_iter), fractional warmup_iter included."""
    opt = _sgd()
    s = AnnealingLR(
        opt, case["lr"], case["lr_decay_iters"], case["warmup"], case["lr_decay_style"], case["lr_decay_ratio"]
    )
    for t, want in case["lr_at"].items():
        assert s.lr_at(int(t)) == pytest.approx(want, rel=1e-12, abs=1e-18), t
    s.step()
    assert opt.param_groups[0]["lr"] == s.lr_at(1)
    s.load_state_dict({"step_num": 7})
    assert opt.param_groups[0]["lr"] == s.lr_at(7)


def test_linear_decay_that_would_reach_zero_is_refused():
    with pytest.raises(ValueError, match="decay_iters: linear decay keeps falling"):
        TrainArgs(max_steps=120, decay_iters=100, warmup=0.1, decay_style="linear", decay_ratio=0.1)
    TrainArgs(max_steps=110, decay_iters=100, warmup=0.1, decay_style="linear", decay_ratio=0.1)  # last lr 0.01
    TrainArgs(max_steps=120, decay_iters=100, warmup=0.1, decay_style="cosine", decay_ratio=0.1)  # cosine holds
    with pytest.raises(ValueError, match="decay_iters"):
        TrainArgs(decay_iters=0)


def test_bad_schedule_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup"):
        AnnealingLR(opt, lr=1.0, decay_iters=10, warmup=1.5)
    with pytest.raises(ValueError, match="style"):
        AnnealingLR(opt, lr=1.0, decay_iters=10, style="step")
