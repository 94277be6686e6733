"""Atomic training checkpoints and exact resume.

A checkpoint is ``out/checkpoints/step-NNNNNNNN/`` holding the model in the hub layout (``config.json`` +
``model.safetensors``, loadable by ``GLM.from_pretrained``) and ``training_state.pt`` (optimizer, scheduler,
every rank's RNG states, tokens seen; the data position is the step itself). It is written to a hidden
temporary folder and renamed into place, and ``latest`` is replaced atomically after that, so a killed run
leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, from_hub_state_dict, load_state_dict, save_state_pretrained
from . import distributed as dist_utils


def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoints"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_training_checkpoint(
    out: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    tokens: int,
    args: dict,
    keep: int = 2,
    base_model=None,
    extra: dict | None = None,
) -> Path:
    """``extra``: the loop's own state (e.g. its model selection), restored by ``load_latest`` as ``state["extra"]``."""
    msd, osd = dist_utils.full_state(model, optimizer)
    rngs = dist_utils.gather_objects(_rng_state())
    rank, _ = dist_utils.rank_world()
    final = _ckpt_dir(out) / f"step-{step:08d}"
    if rank == 0:
        root = _ckpt_dir(out)
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        config = (base_model or model).config
        save_state_pretrained(config, {k: v for k, v in msd.items()}, tmp)
        torch.save(
            {
                "step": step,
                "optimizer": osd,
                "scheduler": scheduler.state_dict(),
                "rng": rngs,
                "tokens": tokens,
                "args": args,
                "extra": extra or {},
            },
            tmp / "training_state.pt",
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / "latest")
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    pointer = _ckpt_dir(out) / "latest"
    if not pointer.is_file():
        return None
    path = _ckpt_dir(out) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def load_latest(out: Path, model, optimizer, base_model=None) -> dict | None:
    """Restore model, optimizer and RNG from the newest checkpoint in ``out``; ``None`` if there is none."""
    path = latest_checkpoint(Path(out))
    if path is None:
        return None
    config = (base_model or model).config
    try:
        msd = from_hub_state_dict(load_state_dict(path), config)
        state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        dist_utils.load_full_state(model, optimizer, msd, state["optimizer"])
    except Exception as e:  # any corruption becomes one clear error; nothing on disk is touched
        raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {e}") from e
    rank, _ = dist_utils.rank_world()
    rng = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
