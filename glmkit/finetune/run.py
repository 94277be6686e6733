"""``finetune`` and ``evaluate_task``: any task (cloze, SuperGLUE, seq2seq) through the one training loop.

Fine-tuning is ``glmkit.train.loop.fit`` with the task's loss as ``loss_fn``, its held-out metrics as
``metric_fn``, batches drawn in seeded epochs (so a resumed run is exact) and the best model kept in
``out_dir/best`` with the tokenizer beside it: a checkpoint folder ``glmkit generate`` and ``serve`` load as is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..train.loop import History, TrainArgs, fit
from .data import OnError, check_on_error, epoch_source, steps_per_epoch
from .tasks import Task


def _finetune_defaults() -> TrainArgs:
    # GLM's SuperGLUE recipe (config_tasks/task_*.sh): lr 1e-5, linear decay, warmup 0.1, weight decay 0.1, batch 16
    return TrainArgs(
        out_dir="runs/finetune",
        lr=1e-5,
        decay_style="linear",
        decay_ratio=0.0,
        warmup=0.1,
        weight_decay=0.1,
        micro_batch_size=16,
        eval_every=100,
        save_every=100,
    )


@dataclass
class FinetuneArgs:
    """A fine-tuning run: the loop's ``TrainArgs`` and what is particular to tasks."""

    train: TrainArgs = field(default_factory=_finetune_defaults)
    epochs: float | None = None
    """Train this many passes over the training rows (sets ``train.max_steps``; ``None``: ``max_steps`` as given)."""
    eval_batch_size: int = 32
    on_bad_row: OnError = "raise"
    """A row that cannot be used stops the run (``raise``) or is reported and left out (``skip``)."""

    def __post_init__(self) -> None:
        check_on_error(self.on_bad_row)
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs: must be positive, got {self.epochs}")
        if self.eval_batch_size <= 0:
            raise ValueError(f"eval_batch_size: must be positive, got {self.eval_batch_size}")


def finetune(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    train_rows: Sequence[Any],
    eval_rows: Sequence[Any] | None = None,
    args: FinetuneArgs | None = None,
    resume: bool = True,
) -> History:
    """Fine-tune ``model`` on ``task``; ``eval_rows`` are evaluated every ``train.eval_every`` steps.

    Rows are ``Record``s (``read_jsonl``, ``superglue.load_split``) or plain dicts. With ``train.best_metric`` (e.g.
    ``"accuracy"``) the best model goes to ``out_dir/best`` with the tokenizer; ``train.patience`` stops early.
    Checkpoints in ``out_dir/checkpoints`` resume the run exactly.
    """
    args = args or FinetuneArgs()
    train_items = task.prepare(tokenizer, train_rows, train=True, on_error=args.on_bad_row)
    if not train_items:
        raise ValueError(f"task {task.name}: no usable training rows")
    eval_items = task.prepare(tokenizer, eval_rows, train=False, on_error=args.on_bad_row) if eval_rows else []
    if eval_rows and not eval_items:
        raise ValueError(f"task {task.name}: no usable evaluation rows")
    targs = args.train
    if args.epochs is not None:
        steps = max(
            1, round(args.epochs * steps_per_epoch(len(train_items), targs.micro_batch_size * targs.grad_accum))
        )
        targs = dataclasses.replace(targs, max_steps=steps, decay_iters=None)
    source = epoch_source(
        len(train_items), targs.micro_batch_size, targs.seed, lambda idx: task.collate([train_items[i] for i in idx])
    )

    def metrics(m: torch.nn.Module) -> dict[str, float]:
        return task.evaluate(m, eval_items, args.eval_batch_size)

    def export(folder: Path) -> None:
        tokenizer.save_pretrained(folder)

    return fit(
        model,
        targs,
        source,
        resume=resume,
        loss_fn=task.loss,
        metric_fn=metrics if eval_items else None,
        export=export if hasattr(tokenizer, "save_pretrained") else None,
    )


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    rows: Sequence[Any],
    batch_size: int = 32,
    on_error: OnError = "raise",
) -> dict[str, float]:
    """The task's metrics (and held-out loss) of ``model`` on ``rows``, e.g. zero-shot or after ``finetune``."""
    items = task.prepare(tokenizer, rows, train=False, on_error=on_error)
    if not items:
        raise ValueError(f"task {task.name}: no usable rows to evaluate")
    return task.evaluate(model, items, batch_size)
