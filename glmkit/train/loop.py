"""The one training loop, for pretraining and fine-tuning alike: they differ only in the data, the loss function
(``loss_fn``: a batch's loss, by default the blank-infilling loss) and how a run is judged (``metric_fn``).

Data comes from a ``BatchSource``: a function from a global micro-batch index to a collated batch. The index of
micro-batch ``m`` of step ``s`` on rank ``r`` of ``w`` is ``(s * grad_accum + m) * w + r``, so a run is a pure
function of (seed, step): resuming needs only the step number, and 2 ranks with ``grad_accum=1`` see exactly
the batches one process with ``grad_accum=2`` sees.

Held-out evaluation runs every ``eval_every`` steps: the loss of each eval source and whatever ``metric_fn``
returns. With ``best_metric`` the best model so far is kept in ``out_dir/best`` (``state.save_model_folder``: a GLM
checkpoint; for a model with LoRA adapters or a P-tuning prefix, the adapter-only folder) and, with ``patience``,
training stops after that many evaluations without improvement; where the search stands is part of each checkpoint,
so a resumed run selects and stops exactly as an uninterrupted one."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..kernels.training import use_training_kernels
from ..masks import pad_batch
from . import distributed as dist_utils
from .optim import AnnealingLR, annealed_lr, param_groups
from .state import checkpoint_layout, load_latest, save_model_folder, save_training_checkpoint

BatchSource = Callable[[int], dict]
LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
MetricFn = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class TrainArgs:
    """Optimisation and bookkeeping of one run (defaults: GLM-Large's recipe where it has one)."""

    out_dir: str = "runs/glm"
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    decay_iters: int | None = None
    """Steps over which the lr anneals (default ``max_steps``)."""
    warmup: float = 0.05
    """Warmup length as a fraction of ``decay_iters`` (AnnealingLR)."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    decay_ratio: float = 0.05
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    eval_every: int = 200
    eval_batches: int = 4
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1234
    parallel: Literal["ddp", "fsdp"] = "ddp"
    compile: bool = False
    """``torch.compile`` the model (fuses the elementwise work; pays a compile at the first steps)."""
    pad_to_multiple: int = 64
    """Pad every batch to a multiple of this many tokens, so CPU kernels are reused across steps."""
    progress: bool = True
    best_metric: str | None = None
    """Keep ``out_dir/best``: the model with the best value of this evaluation result (a ``metric_fn`` key, or an
    eval source's name for its loss)."""
    best_mode: Literal["max", "min"] = "max"
    patience: int = 0
    """Stop after this many evaluations in a row without a better ``best_metric`` (0: never stop early)."""
    merge_lora: bool = False
    """With LoRA adapters: ``out_dir/best/merged`` also holds the merged plain model (what ``glmkit generate`` /
    ``serve`` load) beside the adapter-only folder."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(
                f"lr/grad_clip/weight_decay: must be positive, got {self.lr}/{self.grad_clip}/{self.weight_decay}"
            )
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision: expected bf16 or fp32, got {self.precision!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel: expected ddp or fsdp, got {self.parallel!r}")
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"best_mode: expected max or min, got {self.best_mode!r}")
        if int(self.patience) < 0:
            raise ValueError(f"patience: must be 0 (no early stopping) or a positive integer, got {self.patience!r}")
        if self.patience and not self.best_metric:
            raise ValueError("patience: early stopping needs best_metric, the evaluation result it watches")
        if self.decay_iters is not None and int(self.decay_iters) <= 0:
            raise ValueError(f"decay_iters: must be a positive integer or None, got {self.decay_iters!r}")
        decay_iters = self.decay_iters or self.max_steps
        warmup_iter, last = self.warmup * decay_iters, self.max_steps - 1
        if self.decay_style == "linear" and last > warmup_iter:
            end = annealed_lr(last, 1.0, warmup_iter, decay_iters - warmup_iter, "linear", self.decay_ratio)
            if end <= 0:  # the reference's linear decay does not stop at decay_iters
                raise ValueError(
                    f"decay_iters: linear decay keeps falling after decay_iters={decay_iters}, as THUDM/GLM's "
                    f"AnnealingLR does, and reaches lr 0 before max_steps={self.max_steps}; raise decay_iters or use "
                    f"decay_style cosine"
                )


@dataclass
class History:
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    tokens: int = 0
    best: dict = field(default_factory=dict)
    """With ``best_metric``: ``step``, ``value`` and the evaluation that was best (``out_dir/best`` holds it)."""
    stopped_early: bool = False


def blank_infill_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Σ CE · loss_mask / Σ loss_mask over the micro-batch, in fp32 (pretrain_glm.py ``forward_step``)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    mask = loss_mask.flatten().float()
    return (ce * mask).sum() / mask.sum().clamp_min(1.0)


def batch_loss(model: torch.nn.Module, b: dict) -> torch.Tensor:
    """``blank_infill_loss`` of a batch, computing logits only where the loss mask is set (the same value:
    positions with mask 0 contribute nothing, so their share of the LM head and softmax is skipped)."""
    keep = b["loss_mask"] > 0
    logits = model(b["input_ids"], b["position_ids"], b["attention_mask"], logits_mask=keep)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    weights = b["loss_mask"][keep].float()
    ce = F.cross_entropy(logits.float(), b["targets"][keep], reduction="none")
    return (ce * weights).sum() / weights.sum()


def _autocast(args: TrainArgs, device: torch.device):
    if args.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: dict, device: torch.device, pad_to_multiple: int = 1) -> dict:
    if pad_to_multiple > 1 and "sep" in batch:  # padding is never attended and has no loss: any id will do
        batch = pad_batch(batch, pad_to_multiple)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate(
    model: torch.nn.Module,
    sources: dict[str, BatchSource],
    args: TrainArgs,
    device: torch.device,
    loss_fn: LossFn = batch_loss,
) -> dict:
    """Held-out loss per source (weighted by the loss-mask count over ``eval_batches`` fixed batches)."""
    was_training = model.training
    model.eval()
    out = {}
    rank, world = dist_utils.rank_world()
    with torch.no_grad():
        for name, source in sources.items():
            total = torch.zeros(2, device=device)
            for i in range(rank, args.eval_batches, world):
                b = _to(source(i), device, args.pad_to_multiple)
                with _autocast(args, device):
                    loss = loss_fn(model, b)
                n = b["loss_mask"].sum()
                total += torch.stack([loss * n, n])
            dist_utils.all_reduce_sum(total)
            out[name] = (total[0] / total[1].clamp_min(1)).item()
    model.train(was_training)
    return out


def _metrics(model: torch.nn.Module, metric_fn: MetricFn, args: TrainArgs, device: torch.device) -> dict:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(args, device):
            return {k: float(v) for k, v in metric_fn(model).items()}
    finally:
        model.train(was_training)


def _save_best(out: Path, model, base, step: int, ev: dict, export: Callable[[Path], None] | None, merge: bool) -> None:
    """``out/best``: the model as ``save_model_folder`` writes it (hub layout, adapter-only folder ...),
    ``export``'s files (e.g. the tokenizer) and ``best.json``, replaced whole or not at all."""
    import json

    msd, _ = dist_utils.full_state(model)
    if dist_utils.rank_world()[0] == 0:

        def add(folder: Path) -> None:
            if export is not None:
                export(folder)
            if folder.name != "merged":
                (folder / "best.json").write_text(json.dumps({"step": step, **ev}, indent=2) + "\n")

        save_model_folder(base, out / "best", msd, merge, add)
    dist_utils.barrier()


def fit(
    model: torch.nn.Module,
    args: TrainArgs,
    train_source: BatchSource,
    eval_sources: dict[str, BatchSource] | None = None,
    resume: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    loss_fn: LossFn = batch_loss,
    metric_fn: MetricFn | None = None,
    export: Callable[[Path], None] | None = None,
) -> History:
    """Train ``model`` for ``args.max_steps`` optimizer steps; resumes from ``out_dir`` when a checkpoint exists.

    ``loss_fn(model, batch)`` is the loss of one micro-batch (fine-tuning tasks bring their own);
    ``metric_fn(model)`` returns held-out metrics at each evaluation (called in eval mode, without gradients, on
    every rank); ``export(folder)`` adds files (the tokenizer) to the ``best`` model folder.

    ``model``'s attention and dropout modules are swapped, in place, for glmkit's CPU training kernels
    (``kernels.training.use_training_kernels``: the same function, dropout masks from the kernels' hash)."""
    from .logging import MetricsLogger, ProgressBar

    out = Path(args.out_dir)
    rank, world = dist_utils.rank_world()
    device = dist_utils.device_for_rank()
    torch.manual_seed(args.seed + rank)
    if args.merge_lora and checkpoint_layout(model) != "lora":
        raise ValueError("merge_lora: the model has no LoRA adapters to merge (add_lora gives a model that has)")
    model.to(device).train()
    use_training_kernels(model)  # glmkit's CPU attention and dropout, swapped in before DDP/FSDP wrap the modules
    base = model
    base.gradient_checkpointing = args.activation_checkpointing
    model = dist_utils.wrap(model, args.parallel, device)
    forward = torch.compile(model) if args.compile else model  # state dicts keep using the uncompiled `model`
    optimizer = torch.optim.AdamW(
        param_groups(model, args.weight_decay),
        lr=args.lr,
        betas=args.betas,
        eps=args.eps,
        fused=device.type == "cpu" or None,
    )
    scheduler = AnnealingLR(
        optimizer, args.lr, args.decay_iters or args.max_steps, args.warmup, args.decay_style, args.decay_ratio
    )
    history = History()
    start = 0
    # the model selection: best value so far, its step and evaluation, evaluations since; saved with every checkpoint
    select: dict = {"value": None, "step": None, "eval": {}, "since": 0, "stopped": False}
    if resume:
        state = load_latest(out, model, optimizer, base_model=base)
        if state is not None:
            start = state["step"]
            scheduler.load_state_dict(state["scheduler"])
            history.tokens = state.get("tokens", 0)
            select.update(state.get("extra", {}).get("select", {}))
    if select["step"] is not None:
        history.best = {"step": select["step"], "value": select["value"], **select["eval"]}
    if select["stopped"]:
        history.stopped_early = True
        return history
    logger = MetricsLogger(out, enabled=rank == 0)
    bar = ProgressBar(args.max_steps, start, enabled=rank == 0 and args.progress)
    t_last, tok_last = time.perf_counter(), history.tokens
    for step in range(start, args.max_steps):
        loss_sum = torch.zeros(1, device=device)
        objectives = []
        for micro in range(args.grad_accum):
            b = _to(train_source((step * args.grad_accum + micro) * world + rank), device, args.pad_to_multiple)
            objectives.append(b.get("objective", "blank"))
            sync = micro == args.grad_accum - 1
            with dist_utils.maybe_no_sync(model, sync), _autocast(args, device):
                loss = loss_fn(forward, b)
            (loss / args.grad_accum).backward()
            loss_sum += loss.detach()
            history.tokens += int(b["input_ids"].numel()) * world
        if args.grad_clip > 0:
            grad_norm = dist_utils.clip_grad_norm(model, args.grad_clip)
        else:
            grad_norm = torch.zeros(())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        dist_utils.all_reduce_sum(loss_sum)
        loss_value = loss_sum.item() / (args.grad_accum * world)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step + 1}; lower lr or check the data")
        history.losses.append(loss_value)
        if on_step is not None:
            on_step(step + 1, loss_value)
        done = step + 1
        now = time.perf_counter()
        tok_s = (history.tokens - tok_last) / max(now - t_last, 1e-9)
        bar.update(done, loss_value, tok_s)
        if done % args.log_every == 0 or done == args.max_steps:
            logger.log(
                {
                    "step": done,
                    "loss": loss_value,
                    "lr": scheduler.lr_at(done - 1),
                    "grad_norm": float(grad_norm),
                    "tokens": history.tokens,
                    "tok_per_s": tok_s,
                    "objective": objectives[-1],
                }
            )
            t_last, tok_last = now, history.tokens
        if (eval_sources or metric_fn) and (done % args.eval_every == 0 or done == args.max_steps):
            ev = evaluate(forward, eval_sources, args, device, loss_fn) if eval_sources else {}
            if metric_fn is not None:
                ev.update(_metrics(forward, metric_fn, args, device))
            history.evals.append({"step": done, **ev})
            logger.log({"step": done, **{f"eval/{k}": v for k, v in ev.items()}})
            logger.plot()
            if args.best_metric:
                _select(select, ev, args, done)
                if select["step"] == done:
                    _save_best(out, model, base, done, ev, export, args.merge_lora)
                    history.best = {"step": done, "value": select["value"], **ev}
                history.stopped_early = select["stopped"]
        if done % args.save_every == 0 or done == args.max_steps or history.stopped_early:
            save_training_checkpoint(
                out,
                done,
                model,
                optimizer,
                scheduler,
                history.tokens,
                asdict(args),
                keep=args.keep_checkpoints,
                base_model=base,
                extra={"select": select},
            )
        if history.stopped_early:
            break
    bar.close()
    logger.plot()
    logger.close()
    return history


def _select(select: dict, ev: dict, args: TrainArgs, step: int) -> None:
    """Update the model selection with one evaluation: a new best, or one more evaluation without (and a stop)."""
    if args.best_metric not in ev:
        raise ValueError(f"best_metric: {args.best_metric!r} is not an evaluation result; there are {sorted(ev)}")
    value, best = ev[args.best_metric], select["value"]
    better = best is None or (value > best if args.best_mode == "max" else value < best)
    if better:
        select.update(value=value, step=step, eval=dict(ev), since=0)
    else:
        select["since"] += 1
        select["stopped"] = bool(args.patience) and select["since"] >= args.patience
