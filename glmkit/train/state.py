"""Atomic training checkpoints and exact resume.

A checkpoint is ``out/checkpoints/step-NNNNNNNN/`` holding the model in the hub layout (``config.json`` +
``model.safetensors``, loadable by ``GLM.from_pretrained``) and ``training_state.pt`` (optimizer, scheduler, every
rank's RNG states, tokens seen; the data position is the step itself). Two kinds of model keep their weights under
their own module names instead (``module_state.pt``): a model with adapters (LoRA through peft, a P-tuning v2
prefix), whose checkpoints hold only the trainable adapter or prefix tensors (the frozen base is the run's input and
is never copied), and a model that is not a bare glmkit model (a transformers head such as ``glmkit.hf``'s
pooled-[CLS] classifier), which has no hub layout of its own in glmkit. ``save_model_folder`` writes what a run
hands on (``out/best``): the hub layout, peft's adapter folder or the P-tuning layout (and with ``merge`` the
LoRA-merged model in ``merged/``), or transformers' ``save_pretrained``.

A checkpoint is written to a hidden temporary folder and renamed into place, and ``latest`` is replaced atomically
after that, so a killed run leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from ..checkpoint import CheckpointError, from_hub_state_dict, load_state_dict, save_state_pretrained
from . import distributed as dist_utils

MODULE_STATE = "module_state.pt"
Layout = Literal["hub", "lora", "prefix", "module"]


def _loaded_instance(model, module: str, name: str) -> bool:
    """``isinstance(model, module.name)`` without importing ``module`` (a model of it exists only once it is)."""
    mod = sys.modules.get(module)
    return mod is not None and isinstance(model, getattr(mod, name))


def checkpoint_layout(model: torch.nn.Module) -> Layout:
    """How a model's weights are checkpointed: ``lora`` (a peft ``PeftModel``) and ``prefix`` (a P-tuning v2
    prefix the only trainable part) keep their trainable tensors only, ``module`` (a transformers model) its whole
    state under module names, ``hub`` (glmkit's models) the hub layout."""
    if _loaded_instance(model, "peft", "PeftModel"):
        return "lora"
    if isinstance(getattr(model, "prefix_encoder", None), torch.nn.Module):
        trains = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
        if trains == {"prefix_encoder"}:
            return "prefix"
    if _loaded_instance(model, "transformers", "PreTrainedModel"):
        return "module"
    return "hub"


def _module_state(base: torch.nn.Module, msd: dict, layout: Layout) -> dict:
    if layout == "module":
        return {k: v.detach().cpu() for k, v in msd.items()}
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in msd.items() if k in trainable}


def save_model_folder(
    model: torch.nn.Module,
    folder: Path,
    msd: dict | None = None,
    merge: bool = False,
    export: Callable[[Path], None] | None = None,
) -> None:
    """Write ``model`` as the folder a run hands on, replaced whole: a glmkit model in the hub layout (what
    ``glmkit generate`` / ``serve`` load), LoRA adapters in peft's layout (``adapter_config.json`` +
    ``adapter_model.safetensors``; with ``merge`` also the merged plain model in ``folder/merged``), a P-tuning
    prefix in the released P-tuning layout, a transformers model by its ``save_pretrained``. ``export(folder)``
    adds files (the tokenizer) to every model folder written. ``msd``: the model's gathered state dict (hub only)."""
    from ..checkpoint import save_pretrained, staged_folder

    layout = checkpoint_layout(model)
    if merge and layout != "lora":
        raise ValueError(f"merge_lora: only LoRA adapters fold into the weights; this model is {layout!r}")
    with staged_folder(folder, overwrite=True) as tmp:
        if layout == "hub":
            save_state_pretrained(model.config, msd if msd is not None else model.state_dict(), tmp)
        elif layout == "lora":
            from ..finetune.peft import merge_lora, save_adapter

            save_adapter(model, tmp)
            if merge:  # a copy: the run's own model keeps training with its adapters
                save_pretrained(merge_lora(copy.deepcopy(model)), tmp / "merged")
                if export is not None:
                    export(tmp / "merged")
        elif layout == "prefix":
            from ..finetune.peft import save_prefix

            save_prefix(model, tmp)
        else:
            model.save_pretrained(tmp)
        if export is not None:
            export(tmp)


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
        base = base_model or model
        layout = checkpoint_layout(base)
        if layout == "hub":
            save_state_pretrained(base.config, {k: v for k, v in msd.items()}, tmp)
        else:
            torch.save({"layout": layout, "state": _module_state(base, msd, layout)}, tmp / MODULE_STATE)
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
    base = base_model or model
    try:
        msd = _saved_model_state(path, base)
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


def _saved_model_state(path: Path, base: torch.nn.Module) -> dict:
    """The full state dict to load into ``base`` from checkpoint ``path``: the hub tensors, or (adapters) the
    model's own state with the saved trainable tensors in place. A checkpoint of another kind of run is named."""
    layout = checkpoint_layout(base)
    saved = path / MODULE_STATE
    if layout == "hub":
        if saved.is_file():
            raise CheckpointError(f"{path} holds a {_saved_layout(saved)} run's weights, but the model is a plain one")
        return from_hub_state_dict(load_state_dict(path), base.config)
    if not saved.is_file():
        raise CheckpointError(f"{path} holds a whole model (a full fine-tuning run), but the model is {layout!r}")
    blob = torch.load(saved, map_location="cpu", weights_only=True)
    if blob["layout"] != layout:
        raise CheckpointError(f"{path} holds a {blob['layout']} run's weights, but the model is {layout!r}")
    expected = _module_state(base, base.state_dict(), layout)
    missing, unexpected = sorted(set(expected) - set(blob["state"])), sorted(set(blob["state"]) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the saved tensors do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return {**base.state_dict(), **blob["state"]}


def _saved_layout(saved: Path) -> str:
    return str(torch.load(saved, map_location="cpu", weights_only=True).get("layout"))
