"""Load and save GLM weights in the THUDM layouts: hub (``config.json`` + safetensors / ``pytorch_model.bin``,
optionally sharded) and the original Megatron ``mp_rank_00_model_states.pt``.

Reference key names live only in ``hub_key_map``; the model uses nanoGPT-style names. Loading builds the model
on the meta device and assigns the checkpoint tensors (memory-mapped where the format allows), so a model is
never held twice in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import GLMConfig
from .model import GLM


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match its config; the message names the key or file."""


def hub_key_map(config: GLMConfig) -> dict[str, str]:
    """Hub key (without the ``glm.`` prefix) → glmkit parameter name."""
    m = {
        "word_embeddings.weight": "wte.weight",
        "transformer.position_embeddings.weight": "wpe.weight",
        "transformer.final_layernorm.weight": "ln_f.weight",
        "transformer.final_layernorm.bias": "ln_f.bias",
    }
    if config.block_position_encoding:
        m["transformer.block_position_embeddings.weight"] = "wbpe.weight"
    layer = {
        "input_layernorm": "norm_1",
        "attention.query_key_value": "attn.qkv",
        "attention.dense": "attn.proj",
        "post_attention_layernorm": "norm_2",
        "mlp.dense_h_to_4h": "mlp.fc",
        "mlp.dense_4h_to_h": "mlp.proj",
    }
    for i in range(config.n_layer):
        for hub, ours in layer.items():
            for t in ("weight", "bias"):
                m[f"transformer.layers.{i}.{hub}.{t}"] = f"blocks.{i}.{ours}.{t}"
    return m


# Tensors some released checkpoints carry that are not part of the language model (THUDM/GLM#178, P-tuning).
_IGNORED_PREFIXES = ("dense.", "out_proj.", "prompt_spell.", "pool_layer.", "multichoice_head.")


def from_hub_state_dict(state: dict[str, torch.Tensor], config: GLMConfig) -> dict[str, torch.Tensor]:
    """Rename a hub/Megatron state dict to glmkit names, checking every key and shape against ``config``."""
    kmap = hub_key_map(config)
    expected = _expected_shapes(config)
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, t in state.items():
        k = key[4:] if key.startswith("glm.") else key
        if k not in kmap:
            if not k.startswith(_IGNORED_PREFIXES):
                unexpected.append(key)
            continue
        name = kmap[k]
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(t.shape)} does not match the config's {expected[name]}"
            )
        out[name] = t
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in checkpoint: {unexpected[:10]}")
    missing = [hub for hub, ours in kmap.items() if ours not in out]
    if missing:
        raise CheckpointError(
            f"missing tensor(s) in checkpoint: {missing[:10]} (expected shape {expected[kmap[missing[0]]]})"
        )
    return out


def to_hub_state_dict(model: GLM, prefix: str = "glm.") -> dict[str, torch.Tensor]:
    """The model's tensors under hub key names (``glm.word_embeddings.weight``, ...)."""
    inv = {ours: hub for hub, ours in hub_key_map(model.config).items()}
    return {prefix + inv[name]: t for name, t in model.state_dict().items()}


def _expected_shapes(config: GLMConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = GLM(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    # Megatron checkpoints may pickle their argparse args next to the weights; nothing else is allowed
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # mmap needs the zipfile format; legacy files load without it
            obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        obj = obj["module"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def find_weights(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in the order the formats are preferred."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{folder / index}: not a valid shard index ({e})") from e
            files = [folder / f for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{folder / index} names shard {f.name}, which does not exist")
            return files
    for name in ("model.safetensors", "pytorch_model.bin", "mp_rank_00_model_states.pt"):
        if (folder / name).is_file():
            return [folder / name]
    latest = folder / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        sub = folder / latest.read_text().strip() / "mp_rank_00_model_states.pt"
        if sub.is_file():
            return [sub]
        raise CheckpointError(f"{latest} points at {sub}, which does not exist")
    raise CheckpointError(
        f"{folder}: no weights found (model.safetensors, pytorch_model.bin, a shard index, "
        "or a Megatron mp_rank_00_model_states.pt)"
    )


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in find_weights(Path(folder)):
        state.update(_load_safetensors(f) if f.suffix == ".safetensors" else _torch_load(f))
    return state


def load_pretrained(
    path: str | Path,
    config: GLMConfig | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **config_overrides,
) -> GLM:
    """Load a GLM from a checkpoint folder (hub or Megatron layout). See ``GLM.from_pretrained``."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if config is None:
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: no config.json (pass config= for a Megatron checkpoint)")
        config = GLMConfig.from_file(folder / "config.json", **config_overrides)
    state = from_hub_state_dict(load_state_dict(folder), config)
    with torch.device("meta"):
        model = GLM(config)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def save_pretrained(model: GLM, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (hub key names) atomically: the folder appears complete
    or not at all, and an existing checkpoint is replaced only once the new one is fully written."""
    save_state_pretrained(model.config, model.state_dict(), path, metadata)


def save_state_pretrained(
    config: GLMConfig, state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``save_pretrained`` for a glmkit-named state dict (e.g. gathered from a sharded model)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        config.save(tmp / "config.json")
        inv = {ours: hub for hub, ours in hub_key_map(config).items()}
        state = {"glm." + inv[k]: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
        if dest.exists():
            for f in dest.iterdir():  # keep what else lives there (tokenizer files, README)
                if not (tmp / f.name).exists():
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
