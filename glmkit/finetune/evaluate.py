"""``glmkit evaluate``: one command for every task of the registry: metrics, per-row predictions and a table.

``--model`` is any folder ``glmkit finetune`` writes (``best/``, ``final/``: a full model, peft's LoRA adapter folder,
a P-tuning prefix, a classification head) or any glmkit checkpoint; an adapter is put on the base model its
``finetune.json`` names (or ``--base``). The task comes from ``--task`` (options from ``--config``'s task section
and ``--option KEY=VALUE``) or, by default, from the folder's ``finetune.json``. Writes ``metrics.json``,
``predictions.jsonl`` (one line per row: where, input, prediction, gold, scores) and, for a task with a fixed label
set, ``confusion.png`` (rows: gold, columns: predicted) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, read_json_object
from .cli import RUN_FILE, _yaml

CONFUSION_MAX_LABELS = 30  # beyond this a confusion matrix is unreadable
HEADS = {"classification": "GLMForSequenceClassification", "multiple_choice": "GLMForMultipleChoice"}


def load_for_evaluation(folder: str | Path | None, base: str | Path | None = None) -> tuple[torch.nn.Module, Any]:
    """The model and tokenizer of ``folder`` (``None``: the bundled model), whatever kind ``glmkit finetune``
    wrote; LoRA adapters come back merged into the base (the same function, decoded as fast as a plain model)."""
    from ..bundled import load_model_and_tokenizer, model_path
    from ..tokenizer import load_tokenizer

    path = model_path(folder)
    run = read_json_object(path / RUN_FILE) if (path / RUN_FILE).is_file() else {}
    base = base if base is not None else run.get("base_model")
    config = read_json_object(path / "config.json") if (path / "config.json").is_file() else {}
    if (path / "adapter_config.json").is_file():
        from .peft import load_adapter, merge_lora

        glm, _ = load_model_and_tokenizer(base)
        return merge_lora(load_adapter(glm, path)), load_tokenizer(path)
    if "pre_seq_len" in config and "num_layers" not in config:
        from .peft import load_prefix

        glm, _ = load_model_and_tokenizer(base)
        return load_prefix(glm, path), load_tokenizer(path)
    for head in set(HEADS.values()) & set(config.get("architectures") or []):
        from ..hf import heads

        return getattr(heads, head).from_pretrained(path).eval(), load_tokenizer(path)
    return load_model_and_tokenizer(path)


def task_from(args: argparse.Namespace, model_folder: Path | None) -> tuple[str, dict[str, Any]]:
    """The task name and options: ``--task`` / ``--config`` / ``--option``, else the model folder's run file."""
    options: dict[str, Any] = {}
    name = args.task
    if args.config:
        raw = _yaml(Path(args.config).read_text(encoding="utf-8"), args.config) or {}
        section = raw.get("task") if isinstance(raw, dict) else None
        if not isinstance(section, dict):
            raise ConfigError(f"--config: {args.config} has no task section")
        options = {k: v for k, v in section.items() if k != "name"}
        name = name or section.get("name")
    elif model_folder is not None and (model_folder / RUN_FILE).is_file():
        section = read_json_object(model_folder / RUN_FILE)["task"]
        if name in (None, section.get("name")):
            options, name = {k: v for k, v in section.items() if k != "name"}, section.get("name")
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = _yaml(value, f"--option {item!r}")
    if not name:
        raise ConfigError("--task: give the task to evaluate (the model folder holds no finetune.json naming one)")
    return name, options


def evaluate_command(args: argparse.Namespace) -> dict[str, Any]:
    from rich.progress import Progress

    from .classify import ClassificationTask, MultipleChoiceTask
    from .cloze import ClozeTask
    from .lm import LMTask
    from .predict import (
        predict_classification,
        predict_cloze,
        predict_heldout_cloze,
        predict_lm,
        predict_multiple_choice,
        predict_seq2seq,
    )
    from .registry import HeldOutCloze, build_task, generation_options
    from .seq2seq import Seq2SeqTask
    from .sources import read_rows

    folder = Path(args.model) if args.model else None
    name, options = task_from(args, folder)
    model, tokenizer = load_for_evaluation(folder, args.base)
    glm_config = getattr(model, "config", None)
    context = getattr(glm_config, "n_positions", None) if not hasattr(model, "glm") else model.glm.config.n_positions
    task = build_task(name, options, context)
    have, need = type(model).__name__ if hasattr(model, "glm") else None, HEADS.get(name)
    if have != need:
        raise ConfigError(
            f"--task: {name} does not run on {args.model or 'the bundled model'} ({have or 'a language model'}): "
            f"it needs {need or 'a language model'}; a head task runs on the model glmkit finetune trained for it"
        )
    on_error = "raise" if args.on_bad_row == "error" else "skip"
    with Progress(disable=not args.progress) as bar:
        if isinstance(task, HeldOutCloze):
            job = bar.add_task(name, total=task.items)
            metrics, rows = predict_heldout_cloze(task, model, tokenizer, args.data, lambda n: bar.advance(job, n))
        else:
            items = task.prepare(tokenizer, read_rows(args.data, on_error), train=False, on_error=on_error)
            if not items:
                raise ValueError(f"--data: {args.data} holds no usable rows for task {name}")
            job = bar.add_task(name, total=len(items))

            def advance(n: int) -> None:
                bar.advance(job, n)

            if isinstance(task, ClozeTask):
                metrics, rows = predict_cloze(task, model, items, args.batch_size, advance)
            elif isinstance(task, ClassificationTask):
                metrics, rows = predict_classification(task, model, items, args.batch_size)
            elif isinstance(task, MultipleChoiceTask):
                metrics, rows = predict_multiple_choice(task, model, items, args.batch_size)
            elif isinstance(task, LMTask):
                metrics, rows = predict_lm(task, model, items, args.batch_size)
            elif isinstance(task, Seq2SeqTask):
                generation = generation_options(name, options)
                metrics, rows = predict_seq2seq(task, model, tokenizer, items, generation, args.batch_size, advance)
            else:  # every registry task is one of the above
                raise AssertionError(type(task).__name__)
    out = Path(args.out or f"runs/evaluate-{name}")
    out.mkdir(parents=True, exist_ok=True)
    report = {"task": {"name": name, **options}, "model": args.model or "bundled", "data": str(args.data)}
    report |= {"rows": len(rows), "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    labels = _labels(task)
    if labels and len(labels) <= CONFUSION_MAX_LABELS and any(r["gold"] is not None for r in rows):
        plot_confusion(rows, labels, out / "confusion.png", name)
    print_table(name, metrics, len(rows), out)
    return report


def _labels(task: Any) -> list[str] | None:
    from .classify import ClassificationTask
    from .cloze import ClozeTask

    if isinstance(task, ClassificationTask):
        return [str(x) for x in task.labels]
    if isinstance(task, ClozeTask) and task.verbalizer is not None:
        return [str(x) for x in task.verbalizer]
    return None


def plot_confusion(rows: list[dict], labels: list[str], path: Path, title: str) -> None:
    """Counts of (gold, predicted) label pairs, each gold row's share as the cell's shade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = {label: i for i, label in enumerate(labels)}
    counts = torch.zeros(len(labels), len(labels))
    for r in rows:
        if r["gold"] is not None:
            counts[index[str(r["gold"])], index[str(r["prediction"])]] += 1
    share = counts / counts.sum(1, keepdim=True).clamp_min(1)
    size = 1.6 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="gold", title=f"{title}: confusion (row share shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(name: str, metrics: dict[str, float], n: int, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name}: {n} rows")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:,.0f}" if k in ("tokens", "items") else f"{v:.4f}")
    console = Console()
    console.print(table)
    console.print(f"metrics.json and predictions.jsonl in {out}")


def configure(p: argparse.ArgumentParser) -> None:
    from .registry import REGISTRY

    p.add_argument("--task", help=f"task name: {', '.join(REGISTRY)} (default: the model folder's finetune.json)")
    p.add_argument("--model", help="model folder: a checkpoint or what glmkit finetune wrote (default: bundled)")
    p.add_argument("--base", help="base model of an adapter folder (default: the one its finetune.json names)")
    p.add_argument("--data", required=True, help="rows: .jsonl/.csv/.tsv/.parquet/.txt or hf:NAME[:SPLIT] "
                   "(heldout-cloze: a prepared data folder)")  # fmt: skip
    p.add_argument("--config", help="a finetune YAML whose task section gives the task's options")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a task option (repeatable)")
    p.add_argument("--out", help="folder for metrics.json and predictions.jsonl (default runs/evaluate-TASK)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size: must be positive, got {args.batch_size}")
    evaluate_command(args)
    return 0
