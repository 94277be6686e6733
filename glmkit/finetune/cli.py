"""``glmkit finetune``: fine-tune a model on a task from a YAML config (configs/finetune-*.yaml), flags overriding it.

A config has the sections ``model`` (a checkpoint folder; absent: the bundled model), ``task`` (``name`` and the
task's options: ``glmkit.finetune.registry``), ``data`` (``train``, ``validation``: jsonl / csv / tsv / parquet /
txt files or ``hf:NAME[:SPLIT]``; ``on_bad_row: error | skip``), ``method`` (``name: full | lora | prefix`` and its
options) and ``train`` (``TrainArgs`` fields, ``epochs``, ``eval_batch_size``). The run writes, in ``train.out_dir``:
``checkpoints/`` (resumable; adapters only for LoRA / prefix), ``best/`` (the best model by ``train.best_metric``),
``final/`` (the model after the last step), each with the tokenizer and ``finetune.json`` (task and base model, what
``glmkit evaluate`` reads), ``metrics.jsonl`` and ``history.png`` (training loss, held-out loss and metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError
from ..train.loop import History, TrainArgs
from .run import FinetuneArgs, _finetune_defaults

RUN_FILE = "finetune.json"
SECTIONS = ("model", "task", "data", "method", "train")


@dataclass
class DataConfig:
    train: str | None = None
    validation: str | None = None
    on_bad_row: str = "error"
    """``error``: a bad row stops the run naming its line; ``skip``: it is reported and left out."""

    def __post_init__(self) -> None:
        if self.on_bad_row not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_row: expected error or skip, got {self.on_bad_row!r}")
        for key in ("train", "validation"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ConfigError(f"data.{key}: expected a file path or hf:NAME, got {getattr(self, key)!r}")


@dataclass
class MethodConfig:
    """What trains: the whole model, LoRA adapters (``r``, ``alpha``, ``dropout``, ``targets``; ``merge`` writes the
    merged model too) or a P-tuning v2 prefix (``pre_seq_len``, ``projection``)."""

    name: str = "full"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None
    merge: bool = False
    pre_seq_len: int = 16
    projection: bool = False

    def __post_init__(self) -> None:
        if self.name not in ("full", "lora", "prefix"):
            raise ConfigError(f"method.name: expected full, lora or prefix, got {self.name!r}")
        if self.merge and self.name != "lora":
            raise ConfigError(f"method.merge: only LoRA adapters merge into the weights (method.name is {self.name})")


@dataclass
class FinetuneConfig:
    task: dict[str, Any]
    data: DataConfig
    model: str | None = None
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainArgs = field(default_factory=_finetune_defaults)
    epochs: float | None = None
    eval_batch_size: int = 32


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {value!r}")
    return dict(value)


def _build(cls, section: str, values: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown key; known: {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # TrainArgs' messages start with the field's name
        raise ConfigError(f"{section}.{e}") from e


def load_config(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> FinetuneConfig:
    """A run's config from ``path`` (``None``: flags only), ``overrides`` (section → key → value) on top."""
    raw: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        path, source = Path(path), str(path)
        if not path.is_file():
            raise FileNotFoundError(f"--config: {path} does not exist")
        raw = _yaml(path.read_text(encoding="utf-8"), source) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section of {source}; sections: {', '.join(SECTIONS)}")
    model = raw.get("model")
    sections = {s: _section(raw, s) for s in ("task", "data", "method", "train")}
    base = path.parent if path is not None else Path.cwd()
    for key in ("train", "validation"):  # relative to the config's folder unless they exist from the cwd
        value = sections["data"].get(key)
        if isinstance(value, str) and not value.startswith("hf:") and not Path(value).exists():
            sections["data"][key] = str(base / value)
    for section, values in (overrides or {}).items():
        if section == "model":
            model = values.get("model", model)
        else:
            sections[section].update(values)
    train_overrides = (overrides or {}).get("train", {})
    if "max_steps" in train_overrides and "epochs" not in train_overrides:
        sections["train"].pop("epochs", None)  # a step count given now replaces the config's epochs
    if model is not None and not isinstance(model, str):
        raise ConfigError(f"model: expected a checkpoint folder, got {model!r}")
    if not sections["task"].get("name"):
        raise ConfigError("task.name: no task given (the config's task section or --task)")
    train = sections["train"]
    epochs, eval_batch_size = train.pop("epochs", None), train.pop("eval_batch_size", 32)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0):
        raise ConfigError(f"train.epochs: expected a positive number, got {epochs!r}")
    if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size <= 0:
        raise ConfigError(f"train.eval_batch_size: expected a positive integer, got {eval_batch_size!r}")
    targs = _build(TrainArgs, "train", {**dataclasses.asdict(_finetune_defaults()), **train})
    data = _build(DataConfig, "data", sections["data"])
    if data.train is None:
        raise ConfigError("data.train: no training data given (the config's data section or --train)")
    return FinetuneConfig(
        task=sections["task"],
        data=data,
        model=model,
        method=_build(MethodConfig, "method", sections["method"]),
        train=targs,
        epochs=epochs,
        eval_batch_size=eval_batch_size,
    )


def prepare_model(cfg: FinetuneConfig, task: Any, glm: Any, tokenizer: Any) -> Any:
    """The model that trains: the GLM itself, with LoRA adapters or a prefix, or under a classification head."""
    from .classify import ClassificationTask, MultipleChoiceTask, classification_model
    from .peft import DEFAULT_TARGETS, add_lora, add_prefix

    m = cfg.method
    if isinstance(task, (ClassificationTask, MultipleChoiceTask)):
        if m.name != "full":
            raise ConfigError(f"method.name: the pooled-[CLS] head trains with method full, not {m.name}")
        return classification_model(glm, task, tokenizer)
    try:
        if m.name == "lora":
            return add_lora(glm, m.targets or DEFAULT_TARGETS, m.r, m.alpha, m.dropout)
        if m.name == "prefix":
            return add_prefix(glm, m.pre_seq_len, m.projection)
    except ValueError as e:
        raise ConfigError(f"method.{e}") from e
    return glm


def finetune_from_config(cfg: FinetuneConfig) -> History:
    """Run (or resume) the fine-tuning ``cfg`` describes; see the module notes for what it writes."""
    from ..bundled import load_model_and_tokenizer
    from ..train.state import save_model_folder
    from .peft import count_parameters
    from .registry import REGISTRY, build_task
    from .run import finetune
    from .sources import read_rows

    options = {k: v for k, v in cfg.task.items() if k != "name"}
    name = cfg.task["name"]
    spec = REGISTRY.get(name) if isinstance(name, str) else None
    if spec is not None and not spec.trains:
        raise ConfigError(f"task.name: {name} is an evaluation (glmkit evaluate --task {name}); it does not train")
    glm, tokenizer = load_model_and_tokenizer(cfg.model)
    task = build_task(name, options, glm.config.n_positions)
    on_error = "raise" if cfg.data.on_bad_row == "error" else "skip"
    train_rows = read_rows(cfg.data.train, on_error)
    eval_rows = read_rows(cfg.data.validation, on_error) if cfg.data.validation else None
    torch.manual_seed(cfg.train.seed)  # new adapters / head weights are part of the run: same config, same start
    model = prepare_model(cfg, task, glm, tokenizer)
    print(f"{name} · method {cfg.method.name} · {count_parameters(model)}")
    targs = dataclasses.replace(cfg.train, merge_lora=cfg.method.merge)
    args = FinetuneArgs(train=targs, epochs=cfg.epochs, eval_batch_size=cfg.eval_batch_size, on_bad_row=on_error)
    out = Path(targs.out_dir)
    info = {
        "task": cfg.task,
        "method": dataclasses.asdict(cfg.method),
        "base_model": str(Path(cfg.model).resolve()) if cfg.model else None,
    }

    def export(folder: Path) -> None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder)
        (folder / RUN_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")

    history = finetune(model, tokenizer, task, train_rows, eval_rows, args)
    save_model_folder(model, out / "final", merge=cfg.method.merge, export=export)
    if (out / "best").is_dir():  # fit's best/ has the tokenizer; the run's description is added here
        export(out / "best")
        if (out / "best" / "merged").is_dir():
            export(out / "best" / "merged")
    plot_history(out)
    return history


def plot_history(out: Path) -> Path | None:
    """``out/history.png``: training loss and held-out loss per step (left), the other held-out metrics (right)."""
    log = out / "metrics.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({k for r in evals for k in r if k.startswith("eval/") and k != "eval/loss"})
    fig, axes = plt.subplots(1, 2 if metrics else 1, figsize=(11 if metrics else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train, strict=True), lw=1, marker=".", ms=4, label="train")
    held = [(r["step"], r["eval/loss"]) for r in evals if "eval/loss" in r]
    if held:
        ax.plot(*zip(*held, strict=True), marker="o", ms=3, label="held-out")
    ax.set(xlabel="step", ylabel="task loss", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if metrics:
        ax = axes[0][1]
        for k in metrics:
            pts = [(r["step"], r[k]) for r in evals if k in r]
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=k[5:])
        ax.set(xlabel="step", title="held-out metrics")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "history.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- command line -------------------------------------------------------------------------------------------

FLAGS = {  # flag dest -> (section, key)
    "model": ("model", "model"),
    "task": ("task", "name"),
    "train_file": ("data", "train"),
    "validation_file": ("data", "validation"),
    "on_bad_row": ("data", "on_bad_row"),
    "method": ("method", "name"),
    "lr": ("train", "lr"),
    "epochs": ("train", "epochs"),
    "max_steps": ("train", "max_steps"),
    "batch_size": ("train", "micro_batch_size"),
    "eval_every": ("train", "eval_every"),
    "patience": ("train", "patience"),
    "best_metric": ("train", "best_metric"),
    "out": ("train", "out_dir"),
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run YAML (see configs/finetune-*.yaml); flags override it")
    p.add_argument("--model", help="checkpoint folder to start from (default: the bundled model)")
    from .registry import REGISTRY

    p.add_argument("--task", help=f"task name: {', '.join(n for n, t in REGISTRY.items() if t.trains)}")
    p.add_argument(
        "--train", dest="train_file", help="training data: .jsonl/.csv/.tsv/.parquet/.txt or hf:NAME[:SPLIT]"
    )
    p.add_argument("--validation", dest="validation_file", help="held-out data, evaluated every --eval-every steps")
    p.add_argument("--on-bad-row", choices=["error", "skip"], help="a bad row stops the run (default) or is skipped")
    p.add_argument("--method", choices=["full", "lora", "prefix"])
    p.add_argument("--merge-lora", action="store_true", help="also write the LoRA-merged model (best/merged)")
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--best-metric")
    p.add_argument("--out", help="output folder (train.out_dir)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config value")


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in SECTIONS[1:]:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {SECTIONS[1:]}")
        out.setdefault(section, {})[name] = _yaml(value, f"--set {item!r}")
    for dest, (section, key) in FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            out.setdefault(section, {})[key] = value
    if args.merge_lora:
        out.setdefault("method", {})["merge"] = True
    return out


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides_from(args))
    history = finetune_from_config(cfg)
    out = Path(cfg.train.out_dir)
    if history.best:
        print(
            f"best {cfg.train.best_metric} {history.best['value']:.4f} at step {history.best['step']}: {out / 'best'}"
        )
    if history.losses:
        print(f"trained to loss {history.losses[-1]:.4f}; final model: {out / 'final'}")
    return 0
