"""``glmkit pretrain``: autoregressive blank infilling on prepared token shards, one process or many.

A run is one YAML file with five sections (see configs/): ``model`` (GLMConfig fields), ``data`` (a folder
written by ``glmkit prepare-data``), ``tokenizer`` (the folder the data was tokenized with), ``blank``
(BlankInfillConfig) and ``train`` (TrainArgs). Under ``torchrun`` / ``accelerate launch`` the same command runs
data-parallel (``train.parallel: ddp | fsdp``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import OutputFolderError, check_output_folder, staged_folder
from ..config import ConfigError, GLMConfig
from ..data.blank_infill import BlankInfillCollator, BlankInfillConfig, PretrainBatches
from ..data.packing import PackedDataset
from ..data.shards import TokenShards
from ..model import GLM
from . import distributed
from .loop import History, TrainArgs, fit
from .state import latest_checkpoint

OBJECTIVES = ("bert", "sentence", "gpt")


@dataclass
class PretrainConfig:
    data: str
    tokenizer: str
    model: GLMConfig = field(default_factory=GLMConfig)
    blank: BlankInfillConfig = field(default_factory=BlankInfillConfig)
    train: TrainArgs = field(default_factory=TrainArgs)
    init_from: str | None = None
    """Start from this checkpoint's weights instead of a fresh init."""

    def __post_init__(self) -> None:
        if self.blank.seq_length > self.model.max_sequence_length:
            raise ConfigError(
                f"blank.seq_length: {self.blank.seq_length} is longer than the position table "
                f"(model.max_sequence_length={self.model.max_sequence_length})"
            )


def _build(cls, section: str, values: Any):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}")
    return cls(**values)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a run's YAML; ``overrides`` like ``train.max_steps=100`` replace single values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = _parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, ...), found a {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        values = raw.setdefault(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"override {item!r}: {path} gives {section!r} a single value, not a mapping of keys")
        values[name] = _parse_yaml(value, f"override {item!r}")
    unknown = sorted(set(raw) - {"data", "tokenizer", "model", "blank", "train", "init_from"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}")
    for key in ("data", "tokenizer"):
        if not isinstance(raw.get(key), str):
            raise ConfigError(f"{path}: {key!r} must be a folder path, found {raw.get(key)!r}")
    if not isinstance(raw.get("init_from", ""), (str, type(None))):
        raise ConfigError(f"{path}: 'init_from' must be a checkpoint folder path, found {raw['init_from']!r}")
    base = path.parent

    def resolve(p: str) -> str:  # relative paths are relative to the config file's folder... or the cwd
        return str(p if Path(p).is_absolute() or Path(p).exists() else base / p)

    try:
        return PretrainConfig(
            data=resolve(raw["data"]),
            tokenizer=resolve(raw["tokenizer"]),
            model=_build(GLMConfig, "model", raw.get("model")),
            blank=_build(BlankInfillConfig, "blank", raw.get("blank")),
            train=_build(TrainArgs, "train", raw.get("train")),
            init_from=raw.get("init_from"),
        )
    except ValueError as e:  # ConfigError, or TrainArgs' ValueError: either way the message names the key
        raise ConfigError(f"{path}: {e}") from e


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML: {e.problem or e.context}{where}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e


def batch_sources(cfg: PretrainConfig, split: str, objective: str | None = None) -> PretrainBatches:
    """Deterministic batches of one split; ``objective`` forces one objective (held-out evaluation)."""
    docs = TokenShards(cfg.data, split)
    special = docs.special
    blank = cfg.blank if objective is None else cfg.blank.for_objective(objective)
    if split != "train":
        blank = dataclasses.replace(blank, seed=blank.seed + 7919)  # held-out batches never reuse training draws
    packed = PackedDataset(docs, blank.seq_length, special, seed=blank.seed, sentence_end_ids=docs.sentence_end_ids)
    collator = BlankInfillCollator(blank, special, sentence_end_ids=docs.sentence_end_ids)
    return PretrainBatches(packed, collator, cfg.train.micro_batch_size)


def pretrain(cfg: PretrainConfig, resume: bool = True, overwrite: bool = False) -> History:
    """Run (or resume) the pretraining described by ``cfg``; the final model + tokenizer go to ``out_dir/final``.

    ``resume=False`` starts over, and needs an empty (or absent) ``out_dir`` unless ``overwrite``, which deletes the
    previous run there first (and so never resumes). ``out_dir/final`` is written whole or not at all.
    """
    from ..tokenizer import load_tokenizer

    out = Path(cfg.train.out_dir)
    check_output_folder(out, overwrite=overwrite or resume)
    distributed.init_from_env()
    shards = TokenShards(cfg.data, "train")
    tok = load_tokenizer(cfg.tokenizer)
    if shards.special != tok.special:
        raise ConfigError(f"tokenizer: {cfg.tokenizer} is not the tokenizer {cfg.data} was prepared with")
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} < the tokenizer's {tok.vocab_size} ids")
    model_cfg = dataclasses.replace(cfg.model, special_tokens=tok.special)
    torch.manual_seed(cfg.train.seed)  # the init is part of the run: same config, same weights
    model = GLM.from_pretrained(cfg.init_from) if cfg.init_from else GLM(model_cfg)
    train = batch_sources(cfg, "train")
    evals = {o: batch_sources(cfg, "val", o) for o in OBJECTIVES if _used(cfg.blank, o)}
    if overwrite and out.exists():  # only now: a config mistake found above leaves the previous run as it was
        _discard_run(out, cfg)
    history = fit(model, cfg.train, train, evals, resume=resume and not overwrite)
    if distributed.rank_world()[0] == 0:  # the last checkpoint holds the (gathered) model in the hub layout
        with staged_folder(out / "final", overwrite=True) as final:
            ignore = shutil.ignore_patterns("training_*")
            shutil.copytree(latest_checkpoint(out), final, ignore=ignore, dirs_exist_ok=True)
            tok.save_pretrained(final)
    distributed.shutdown()
    return history


def _discard_run(out: Path, cfg: PretrainConfig) -> None:
    """Delete the previous run in ``out`` (rank 0), unless ``out`` holds this run's inputs or the working folder."""
    inputs = [Path(cfg.data), Path(cfg.tokenizer), Path.cwd()] + ([Path(cfg.init_from)] if cfg.init_from else [])
    for p in inputs:
        if out.resolve() == p.resolve() or out.resolve() in p.resolve().parents:
            raise OutputFolderError(f"train.out_dir: {out} holds {p}; --overwrite would delete it, choose another")
    if distributed.rank_world()[0] == 0:
        shutil.rmtree(out)
    distributed.barrier()


def _used(blank: BlankInfillConfig, objective: str) -> bool:
    prob = {"bert": blank.bert_prob, "sentence": blank.gap_sentence_prob}
    return prob.get(objective, 1.0 - blank.bert_prob - blank.gap_sentence_prob) > 0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run YAML (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one value")
    p.add_argument("--no-resume", action="store_true", help="start over; out_dir must be empty (or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="delete the previous run in out_dir and start over")


def run(args: argparse.Namespace) -> int:
    history = pretrain(load_config(args.config, args.set), resume=not args.no_resume, overwrite=args.overwrite)
    if history.losses:
        print(f"trained to loss {history.losses[-1]:.4f}; {history.tokens:,} tokens seen")
    return 0
