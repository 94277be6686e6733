import math

import pytest
import torch

from glmkit.train.optim import AnnealingLR, param_groups


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


def test_annealing_lr_matches_reference_formula():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = AnnealingLR(opt, lr=4e-4, decay_iters=1000, warmup=0.05, style="cosine", decay_ratio=0.05)
    assert s.lr_at(0) == 0 and s.lr_at(25) == pytest.approx(2e-4) and s.lr_at(50) == pytest.approx(4e-4)
    p = (525 - 50) / 950
    assert s.lr_at(525) == pytest.approx(4e-4 * (0.05 + 0.95 * (1 + math.cos(math.pi * p)) / 2))
    assert s.lr_at(1000) == pytest.approx(4e-4 * 0.05) and s.lr_at(5000) == pytest.approx(4e-4 * 0.05)
    lin = AnnealingLR(opt, lr=1.0, decay_iters=100, warmup=0.0, style="linear", decay_ratio=0.1)
    assert lin.lr_at(50) == pytest.approx(1 - 0.9 * 0.5)
    s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(s.lr_at(1))


def test_bad_schedule_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup"):
        AnnealingLR(opt, lr=1.0, decay_iters=10, warmup=1.5)
    with pytest.raises(ValueError, match="style"):
        AnnealingLR(opt, lr=1.0, decay_iters=10, style="step")
