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
    raw = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    unknown = sorted(set(raw) - {"data", "tokenizer", "model", "blank", "train", "init_from"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}")
    for key in ("data", "tokenizer"):
        if key not in raw:
            raise ConfigError(f"{path}: missing {key!r} (a folder path)")
    base = path.parent

    def resolve(p: str) -> str:  # relative paths are relative to the config file's folder... or the cwd
        return str(p if Path(p).is_absolute() or Path(p).exists() else base / p)

    return PretrainConfig(
        data=resolve(raw["data"]),
        tokenizer=resolve(raw["tokenizer"]),
        model=_build(GLMConfig, "model", raw.get("model")),
        blank=_build(BlankInfillConfig, "blank", raw.get("blank")),
        train=_build(TrainArgs, "train", raw.get("train")),
        init_from=raw.get("init_from"),
    )


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


def pretrain(cfg: PretrainConfig, resume: bool = True) -> History:
    """Run (or resume) the pretraining described by ``cfg``; the final model + tokenizer go to ``out_dir/final``."""
    from ..tokenizer import load_tokenizer

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
    history = fit(model, cfg.train, train, evals, resume=resume)
    if distributed.rank_world()[0] == 0:  # the last checkpoint holds the (gathered) model in the hub layout
        final = Path(cfg.train.out_dir) / "final"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(latest_checkpoint(Path(cfg.train.out_dir)), final, ignore=shutil.ignore_patterns("training_*"))
        tok.save_pretrained(final)
    distributed.shutdown()
    return history


def _used(blank: BlankInfillConfig, objective: str) -> bool:
    prob = {"bert": blank.bert_prob, "sentence": blank.gap_sentence_prob}
    return prob.get(objective, 1.0 - blank.bert_prob - blank.gap_sentence_prob) > 0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run YAML (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one value")
    p.add_argument("--no-resume", action="store_true", help="start over even if out_dir has a checkpoint")


def run(args: argparse.Namespace) -> int:
    history = pretrain(load_config(args.config, args.set), resume=not args.no_resume)
    if history.losses:
        print(f"trained to loss {history.losses[-1]:.4f}; {history.tokens:,} tokens seen")
    return 0
