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


class AnnealingLR:
    """Linear warmup from 0 over ``warmup * decay_iters`` steps, then cosine or linear decay to
    ``decay_ratio * lr`` at ``decay_iters``, constant afterwards. ``lr_at(t)`` is a pure function of the step,
    so resuming only needs the step number.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        decay_iters: int,
        warmup: float = 0.01,
        style: Literal["cosine", "linear", "constant"] = "cosine",
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
        self.optimizer, self.lr, self.decay_iters = optimizer, lr, decay_iters
        self.warmup_iter = int(warmup * decay_iters)
        self.style, self.decay_ratio = style, decay_ratio
        self.step_num = 0
        self._apply()

    def lr_at(self, t: int) -> float:
        if self.warmup_iter > 0 and t <= self.warmup_iter:
            return self.lr * t / self.warmup_iter
        if self.style == "constant":
            return self.lr
        p = min(1.0, (t - self.warmup_iter) / max(1, self.decay_iters - self.warmup_iter))
        r = self.decay_ratio
        if self.style == "cosine":
            return self.lr * (r + (1 - r) * (1 + math.cos(math.pi * p)) / 2)
        return self.lr * (1 - (1 - r) * p)

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
