"""AdamW with GLM's parameter groups and the reference ``AnnealingLR`` schedule (THUDM/GLM learning_rates.py)."""

from __future__ import annotations

import math
from typing import Literal

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on LayerNorm parameters and biases (``glm_get_params_for_weight_decay_optimization``).

    Only the last two name parts are read, so a wrapped model (DDP's ``module.``, ``torch.compile``'s
    ``_orig_mod.``) is grouped like the bare one.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.split(".")[-2]
        is_norm = "norm" in owner or owner == "ln_f"
        (no_decay if is_norm or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


Style = Literal["cosine", "linear", "constant"]


def annealed_lr(t: float, lr: float, warmup_iter: float, end_iter: float, style: Style, decay_ratio: float) -> float:
    """The learning rate at step ``t`` of THUDM/GLM ``learning_rates.AnnealingLR(start_lr=lr, warmup_iter,
    num_iters=end_iter, decay_style=style, decay_ratio)`` (its ``get_lr``; exponential is a TODO there that
    returns ``lr``, so it is ``constant`` here).

    Linear warmup from 0 to ``lr`` over ``warmup_iter`` steps; then the progress is ``(t - warmup_iter) / end_iter``.
    Cosine holds at ``decay_ratio * lr`` once the progress reaches 1. Linear reaches ``decay_ratio * lr`` there and
    keeps falling, through 0 at progress ``1 / (1 - decay_ratio)`` (``TrainArgs`` refuses runs that get there).
    """
    if warmup_iter > 0 and t <= warmup_iter:
        return lr * t / warmup_iter
    if style == "linear":
        return lr * (1 - (1 - decay_ratio) * (t - warmup_iter) / end_iter)
    if style == "cosine":
        p = min(1.0, (t - warmup_iter) / end_iter)
        return lr * (decay_ratio + (1 - decay_ratio) * (1 + math.cos(math.pi * p)) / 2)
    return lr


class AnnealingLR:
    """The reference schedule as ``pretrain_glm.py`` builds it (THUDM/GLM ``train_utils.get_learning_rate_scheduler``):
    ``warmup_iter = warmup * decay_iters`` and ``end_iter = decay_iters - warmup_iter``, so the decay ends at step
    ``decay_iters`` (see ``annealed_lr``). ``lr_at(t)`` is a pure function of the step, so resuming only needs the
    step number.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        decay_iters: int,
        warmup: float = 0.01,
        style: Style = "cosine",
        decay_ratio: float = 0.1,
    ) -> None:
        if decay_iters <= 0:
            raise ValueError(f"decay_iters: must be positive, got {decay_iters}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup: a fraction of decay_iters in [0, 1), got {warmup}")
        if style not in ("cosine", "linear", "constant"):
            raise ValueError(f"style: expected cosine, linear or constant, got {style!r}")
        if not 0.0 <= decay_ratio <= 1.0:
            raise ValueError(f"decay_ratio: expected a value in [0, 1], got {decay_ratio}")
        self.optimizer, self.lr = optimizer, lr
        self.warmup_iter = warmup * decay_iters
        self.end_iter = decay_iters - self.warmup_iter
        self.style, self.decay_ratio = style, decay_ratio
        self.step_num = 0
        self._apply()

    def lr_at(self, t: int) -> float:
        return annealed_lr(t, self.lr, self.warmup_iter, self.end_iter, self.style, self.decay_ratio)

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step_num)

    def step(self) -> None:
        self.step_num += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_num": self.step_num}

    def load_state_dict(self, state: dict) -> None:
        self.step_num = int(state["step_num"])
        self._apply()
