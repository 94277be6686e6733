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
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import GLMConfig, read_json_object
from .model import GLM
from .quantize.scheme import METADATA_KEY, QuantScheme, read_scheme


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match its config; the message names the key or file."""


class OutputFolderError(CheckpointError):
    """The folder a checkpoint is to be written to is a file, or holds something that ``overwrite`` would lose."""


# THUDM's parameter names inside a block, which GLM and ChatGLM-6B share → glmkit's
HUB_BLOCK_KEYS = {
    "input_layernorm": "norm_1",
    "attention.query_key_value": "attn.qkv",
    "attention.dense": "attn.proj",
    "post_attention_layernorm": "norm_2",
    "mlp.dense_h_to_4h": "mlp.fc",
    "mlp.dense_4h_to_h": "mlp.proj",
}


def hub_block_keys(n_layer: int) -> dict[str, str]:
    """``transformer.layers.{i}.<hub name>.weight|bias`` → ``blocks.{i}.<glmkit name>.weight|bias``."""
    return {
        f"transformer.layers.{i}.{hub}.{t}": f"blocks.{i}.{ours}.{t}"
        for i in range(n_layer)
        for hub, ours in HUB_BLOCK_KEYS.items()
        for t in ("weight", "bias")
    }


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
    m.update(hub_block_keys(config.n_layer))
    if scheme is not None:
        scaled = {n.removesuffix("_scale") for n in _expected_tensors(config, scheme) if n.endswith(".weight_scale")}
        m.update({hub + "_scale": ours + "_scale" for hub, ours in list(m.items()) if ours in scaled})
    return m


# Tensors some released checkpoints carry that are not part of the language model (THUDM/GLM#178, P-tuning), and the
# head of a classifier glmkit.hf saved (its language model loads alone).
_IGNORED_PREFIXES = ("dense.", "out_proj.", "prompt_spell.", "pool_layer.", "multichoice_head.", "classifier.")


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
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # a plain pickle (not torch.save's format) draws a protocol warning before the refusal below says more
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # mmap needs the zipfile format; legacy files load without it
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler refused an object, or the bytes are no pickle
        raise CheckpointError(
            f"{path}: refused to load: not a plain tensor checkpoint ({_pickle_reason(e)}); glmkit never unpickles "
            "code or objects other than tensors, so convert the file to safetensors where it is trusted"
        ) from e
    except (RuntimeError, EOFError) as e:  # what torch.load raises for a truncated or corrupted file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from e
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        obj = obj["module"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _pickle_reason(e: pickle.UnpicklingError) -> str:
    """The first sentence of the specific reason in torch's weights-only error, without its advice to load with
    weights_only=False or to allowlist the object."""
    tail = str(e).split("WeightsUnpickler error:", 1)[-1]
    paragraphs = [p.strip() for p in tail.split("\n\n") if p.strip()]
    specific = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation"))]
    first = (specific or paragraphs or ["not a pickle"])[0]
    return " ".join(first.split(". ", 1)[0].split()).rstrip(".")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupted? ({e})") from e


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupted? ({e})") from e


def read_quantization(folder: str | Path) -> QuantScheme | None:
    """The quantization scheme a checkpoint folder records (config.json and safetensors header must agree)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return None
    try:
        config = read_json_object(folder / "config.json")
        for f in find_weights(folder):
            if f.suffix == ".safetensors":  # every header must record what config.json records
                read_scheme(config, folder / "config.json", read_metadata(f), f)
        return read_scheme(config, folder / "config.json")
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def find_weights(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in the order the formats are preferred."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = read_json_object(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{folder / index}: not a shard index (no weight_map of tensor name to file)")
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
    """Load a GLM from a checkpoint folder (hub or Megatron layout). See ``GLM.from_pretrained``. A ChatGLM-family
    folder (``model_type: "chatglm"``) loads as its own model class (``glmkit.chatglm.hub.load_pretrained``)."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if config is None and (folder / "config.json").is_file():
        if read_json_object(folder / "config.json").get("model_type") == "chatglm":
            from .chatglm.hub import load_pretrained as load_chatglm

            return load_chatglm(folder, dtype=dtype, device=device, **config_overrides)
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
    with staged_folder(dest, overwrite=True) as tmp:
        hub_config = config.to_hub_dict()
        metadata = {"format": "pt", **(metadata or {})}
        if quantization is not None:
            hub_config[METADATA_KEY] = quantization.to_dict()
            metadata[METADATA_KEY] = json.dumps(quantization.to_dict())
        (tmp / "config.json").write_text(json.dumps(hub_config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in _to_hub_names(state, config, quantization).items()}
        save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
        if dest.is_dir():
            for f in dest.iterdir():  # keep what else lives there (tokenizer files, README)
                if not (tmp / f.name).exists():
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)


def check_output_folder(path: str | Path, overwrite: bool = False) -> Path:
    """``path`` as a folder a new checkpoint may take: absent or empty, or (``overwrite``) any folder. A file, or a
    folder with content without ``overwrite``, raises ``OutputFolderError``."""
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise OutputFolderError(f"{dest} is a file, not a folder; give a folder for the checkpoint")
    if not overwrite and dest.is_dir():
        held = sorted(f.name for f in dest.iterdir())
        if held:
            shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
            raise OutputFolderError(
                f"{dest} is not empty (it holds {shown}); "
                "choose another folder, or pass --overwrite to replace it whole"
            )
    return dest


@contextmanager
def staged_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden temporary folder next to ``path`` for the caller to fill; when the block ends it becomes ``path`` in
    one rename (with ``overwrite``, replacing the old folder whole), and when the block raises, KeyboardInterrupt
    included, it is removed and ``path`` is left as it was. ``path`` is checked by ``check_output_folder`` first."""
    dest = check_output_folder(path, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    old = tmp.with_suffix(".old")
    try:
        yield tmp
        _normal_permissions(tmp)
        if dest.is_dir() and any(dest.iterdir()):  # a rename replaces only an empty folder: move the old one aside
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)
                raise
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
