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
from .quantize.scheme import METADATA_KEY, QuantScheme, read_scheme


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match its config; the message names the key or file."""


def hub_key_map(config: GLMConfig, scheme: QuantScheme | None = None) -> dict[str, str]:
    """Hub key (without the ``glm.`` prefix) → glmkit parameter name; with ``scheme``, quantized weights add
    ``<name>.weight_scale`` (ChatGLM's hub naming)."""
    m = {
        "word_embeddings.weight": "wte.weight",
        "transformer.final_layernorm.weight": "ln_f.weight",
        "transformer.final_layernorm.bias": "ln_f.bias",
    }
    if config.position_encoding == "learned":
        m["transformer.position_embeddings.weight"] = "wpe.weight"
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
    if scheme is not None:
        scaled = {n.removesuffix("_scale") for n in _expected_tensors(config, scheme) if n.endswith(".weight_scale")}
        m.update({hub + "_scale": ours + "_scale" for hub, ours in list(m.items()) if ours in scaled})
    return m


# Tensors some released checkpoints carry that are not part of the language model (THUDM/GLM#178, P-tuning).
_IGNORED_PREFIXES = ("dense.", "out_proj.", "prompt_spell.", "pool_layer.", "multichoice_head.")


def from_hub_state_dict(
    state: dict[str, torch.Tensor], config: GLMConfig, scheme: QuantScheme | None = None
) -> dict[str, torch.Tensor]:
    """Rename a hub/Megatron state dict to glmkit names, checking every key and shape against ``config`` and, for a
    quantized checkpoint, every quantized tensor's shape and dtype against ``scheme``."""
    kmap = hub_key_map(config, scheme)
    expected = _expected_tensors(config, scheme)
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, t in state.items():
        k = key[4:] if key.startswith("glm.") else key
        if k not in kmap:
            if not k.startswith(_IGNORED_PREFIXES):
                unexpected.append(key)
            continue
        name, exp = kmap[k], expected[kmap[k]]
        if t.is_floating_point() != exp.is_floating_point() or (not exp.is_floating_point() and t.dtype != exp.dtype):
            source = f"its quantization metadata ({scheme.describe()})" if scheme else "its config (not quantized)"
            raise CheckpointError(
                f"{key}: checkpoint has {t.dtype} {tuple(t.shape)}, but {source} implies {exp.dtype} {tuple(exp.shape)}"
            )
        if t.shape != exp.shape:
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(t.shape)} does not match the config's {tuple(exp.shape)}"
            )
        out[name] = t
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in checkpoint: {unexpected[:10]}")
    missing = [hub for hub, ours in kmap.items() if ours not in out]
    if missing:
        raise CheckpointError(
            f"missing tensor(s) in checkpoint: {missing[:10]} "
            f"(expected shape {tuple(expected[kmap[missing[0]]].shape)})"
        )
    return out


def to_hub_state_dict(model: GLM, prefix: str = "glm.") -> dict[str, torch.Tensor]:
    """The model's tensors under hub key names (``glm.word_embeddings.weight``, ...)."""
    from .quantize.modules import scheme_of

    return _to_hub_names(model.state_dict(), model.config, scheme_of(model), prefix)


def _to_hub_names(state: dict[str, torch.Tensor], config: GLMConfig, quantization, prefix: str = "glm.") -> dict:
    inv = {ours: hub for hub, ours in hub_key_map(config, quantization).items()}
    return {prefix + inv[name]: t for name, t in state.items()}


def _meta_model(config: GLMConfig, scheme: QuantScheme | None) -> GLM:
    with torch.device("meta"):
        model = GLM(config)
    if scheme is not None:
        from .quantize.modules import convert_for_runtime

        convert_for_runtime(model, scheme)
    return model


def _expected_tensors(config: GLMConfig, scheme: QuantScheme | None) -> dict[str, torch.Tensor]:
    """Meta tensors with the shape and dtype (integer ones exact, float ones any float) of every checkpoint tensor."""
    return dict(_meta_model(config, scheme).state_dict())


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


def read_quantization(folder: str | Path) -> QuantScheme | None:
    """The quantization scheme a checkpoint folder records (config.json and safetensors header must agree)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
        for f in find_weights(folder):
            if f.suffix == ".safetensors":  # every header must record what config.json records
                read_scheme(config, folder / "config.json", read_metadata(f), f)
        return read_scheme(config, folder / "config.json")
    except (ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(str(e)) from e


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
    scheme = read_quantization(folder)
    state = from_hub_state_dict(load_state_dict(folder), config, scheme)
    model = _meta_model(config, scheme)
    # integer (quantized) tensors keep their dtype; every float tensor, quantization scales included, takes ``dtype``
    state = {
        k: v.to(device=device, dtype=dtype if dtype and v.is_floating_point() else v.dtype) for k, v in state.items()
    }
    if scheme is not None:
        from .quantize.modules import interleave_state_

        interleave_state_(model, state)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes private folders; a checkpoint should get the permissions of any file the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def save_pretrained(model: GLM, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (hub key names) atomically: the folder appears complete
    or not at all, and an existing checkpoint is replaced only once the new one is fully written. A quantized model
    records its scheme in both config.json and the safetensors header."""
    from .quantize.modules import scheme_of

    save_state_pretrained(model.config, model.state_dict(), path, metadata, scheme_of(model))


def save_state_pretrained(
    config: GLMConfig,
    state: dict[str, torch.Tensor],
    path: str | Path,
    metadata: dict[str, str] | None = None,
    quantization: QuantScheme | None = None,
) -> None:
    """``save_pretrained`` for a glmkit-named state dict (e.g. gathered from a sharded model)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        hub_config = config.to_hub_dict()
        metadata = {"format": "pt", **(metadata or {})}
        if quantization is not None:
            hub_config[METADATA_KEY] = quantization.to_dict()
            metadata[METADATA_KEY] = json.dumps(quantization.to_dict())
        (tmp / "config.json").write_text(json.dumps(hub_config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in _to_hub_names(state, config, quantization).items()}
        save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
        _normal_permissions(tmp)
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
