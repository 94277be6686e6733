"""Load and save the ChatGLM family in the THUDM hub layouts.

A hub folder holds ``config.json`` and the weights under ``transformer.`` key names, in one file or sharded
(``pytorch_model-0000k-of-0000n.bin`` / ``model-0000k-of-0000n.safetensors`` + the ``.index.json``), read through
glmkit/checkpoint.py: safetensors, or ``torch.load(weights_only=True)``, memory-mapped where the format allows, into a
model built on the meta device (never held twice in memory).

Every ChatGLM generation says ``model_type: "chatglm"``; the family is told by its config fields (``FAMILIES``):
ChatGLM-6B has ``position_encoding_2d`` / ``inner_hidden_size``, ChatGLM2/3 and GLM-4 ``multi_query_group_num`` /
``ffn_hidden_size``. A family registers its config parser, model class and hub key names with ``register``.

Quantized checkpoints: the hub's own ``-int4`` / ``-int8`` ones (``quantization_bit``, ``weight_scale``; the format
is ``glmkit.quantize.scheme.HubQuantization``) load losslessly into glmkit's quantized layers, and glmkit-quantized
ones (``glmkit_quantization``, as ``glmkit quantize`` writes) as the GLM loader loads them. ``save_pretrained``
writes the hub layout back, hub-quantized where the weights fit that format exactly.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, load_state_dict, read_quantization, staged_folder
from ..config import ConfigError, read_json_object
from ..quantize.modules import QuantizedEmbedding, QuantizedLinear, convert_for_runtime, interleave_state_, scheme_of
from ..quantize.scheme import METADATA_KEY, HubQuantization, QuantScheme
from . import v1
from .v1 import ChatGLM6B, ChatGLM6BConfig, hub_key_map, is_ignored_hub_key
from .v2 import ChatGLM2, ChatGLM2Config

QUANTIZED_LAYERS = "blocks."  # the hub quantizes every linear layer of the transformer layers, nothing else


@dataclass(frozen=True)
class Family:
    """One ChatGLM generation: how to recognise its config.json, parse it, build the model, and name its tensors.

    ``hub_names(config)`` maps hub key → glmkit parameter name for the float model; ``ignored(key)`` says which hub
    tensors the hub code itself skips on load (rotary ``inv_freq`` buffers)."""

    name: str
    detect: Callable[[dict[str, Any]], bool]
    config_from_hub: Callable[..., Any]
    model: type[nn.Module]
    hub_names: Callable[[Any], dict[str, str]]
    ignored: Callable[[str], bool]


FAMILIES: list[Family] = []


def register(family: Family) -> None:
    """Add a family (a later one with the same name replaces it)."""
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name] + [family]


def family_of(d: dict[str, Any]) -> Family:
    """The family a parsed hub config belongs to; ``ConfigError`` naming the fields when none fits."""
    found = [f for f in FAMILIES if f.detect(d)]
    if len(found) != 1:
        names = [f.name for f in found] if found else [f.name for f in FAMILIES]
        raise ConfigError(
            f"model_type 'chatglm': cannot tell the generation from the fields {sorted(d)}; expected ChatGLM-6B's "
            "(position_encoding_2d, inner_hidden_size) or ChatGLM2/3/GLM-4's (multi_query_group_num, "
            f"ffn_hidden_size, kv_channels) — {'several fit: ' if found else 'known: '}{names}"
        )
    return found[0]


register(
    Family(
        name="chatglm6b",
        detect=lambda d: "position_encoding_2d" in d or "inner_hidden_size" in d,
        config_from_hub=ChatGLM6BConfig.from_hub_dict,
        model=ChatGLM6B,
        hub_names=hub_key_map,
        ignored=is_ignored_hub_key,
    )
)


# ---- ChatGLM2 / ChatGLM3 / GLM-4 hub names -------------------------------------------------------------------------

_V2_LAYER = {
    "norm_1": "input_layernorm",
    "attn.qkv": "self_attention.query_key_value",
    "attn.proj": "self_attention.dense",
    "norm_2": "post_attention_layernorm",
    "mlp.fc": "mlp.dense_h_to_4h",
    "mlp.proj": "mlp.dense_4h_to_h",
}
_V2_TOP = {
    "wte": "embedding.word_embeddings",
    "lm_head": "output_layer",
    "ln_f": "encoder.final_layernorm",
    "prefix_encoder": "prefix_encoder",
}


def _v2_hub_name(name: str) -> str:
    head, _, rest = name.partition(".")
    if head != "blocks":
        return f"transformer.{_V2_TOP[head]}.{rest}"
    i, _, rest = rest.partition(".")
    module, _, tensor = rest.rpartition(".")
    return f"transformer.encoder.layers.{i}.{_V2_LAYER[module]}.{tensor}"


def v2_hub_names(config: ChatGLM2Config) -> dict[str, str]:
    """Hub key → glmkit name for a float ChatGLM2/3/GLM-4 model of ``config``."""
    with torch.device("meta"):
        names = list(ChatGLM2(config).state_dict())
    return {_v2_hub_name(n): n for n in names}


register(
    Family(
        name="chatglm2",
        detect=lambda d: "multi_query_group_num" in d or "ffn_hidden_size" in d or "kv_channels" in d,
        config_from_hub=ChatGLM2Config.from_hub_dict,
        model=ChatGLM2,
        hub_names=v2_hub_names,
        ignored=lambda key: key == "transformer.rotary_pos_emb.inv_freq",
    )
)


register(
    Family(
        name="chatglm6b",
        detect=lambda d: "position_encoding_2d" in d or "inner_hidden_size" in d,
        config_from_hub=v1.ChatGLM6BConfig.from_hub_dict,
        model=v1.ChatGLM6B,
        hub_names=v1.hub_key_map,
        ignored=v1.is_ignored_hub_key,
    )
)


# ---- loading --------------------------------------------------------------------------------------------------


def _hub_quantization(d: dict[str, Any], path: Path) -> HubQuantization | None:
    bits = d.get("quantization_bit")
    if bits in (None, 0):
        return None
    try:
        return HubQuantization(bits)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e


def _layer_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Where the hub puts quantized layers: every linear layer (float or quantized) of the transformer layers."""
    kinds = (nn.Linear, QuantizedLinear)
    return {n: m for n, m in model.named_modules() if n.startswith(QUANTIZED_LAYERS) and isinstance(m, kinds)}


def _swap_for_hub(model: nn.Module, hub: HubQuantization) -> None:
    """Give the transformer layers of a meta ``model`` the empty quantized layers hub weights load into."""
    linears = _layer_linears(model)
    scheme = hub.runtime_scheme([m.in_features for m in linears.values()])
    for name, m in linears.items():
        parent, _, attr = name.rpartition(".")
        new = QuantizedLinear(m.in_features, m.out_features, m.bias is not None, scheme, "meta")
        setattr(model.get_submodule(parent), attr, new)


def _check(key: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None, why: str) -> None:
    """``dtype`` None: any float tensor."""
    if (t.dtype != dtype) if dtype is not None else not t.is_floating_point():
        raise CheckpointError(f"{key}: checkpoint has {t.dtype}, expected {dtype or 'a float tensor'} ({why})")
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{key}: checkpoint shape {tuple(t.shape)} does not match {shape} ({why})")


def _rename(
    state: dict[str, torch.Tensor], family: Family, config: Any, model: nn.Module, hub: HubQuantization | None
) -> dict[str, torch.Tensor]:
    """The checkpoint under glmkit names, every key, shape and dtype checked; hub-quantized weights converted to
    glmkit's layout (exactly)."""
    names = family.hub_names(config)
    expected = model.state_dict()  # meta tensors of the model as built (quantized layers included)
    quantized = {n for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    for hub_key, ours in list(names.items()):
        if ours.removesuffix(".weight") in quantized and ours.endswith(".weight"):
            names[hub_key + "_scale"] = ours + "_scale"
    out: dict[str, torch.Tensor] = {}
    unexpected = [k for k in state if k not in names and not family.ignored(k)]
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in checkpoint: {unexpected[:10]}")
    missing = [k for k, ours in names.items() if k not in state]
    if missing:
        scales = [k for k in missing if k.endswith("weight_scale")]
        need = "every quantized weight needs its fp16 per-row weight_scale"
        note = f" (quantization_bit={hub.bits}: {need})" if hub else ""
        raise CheckpointError(f"missing tensor(s) in checkpoint: {missing[:10]}" + (note if scales else ""))
    for key, ours in names.items():
        t, exp = state[key], expected[ours]
        module = ours.rpartition(".")[0]
        if hub is not None and module in quantized and ours.endswith((".weight", ".weight_scale")):
            if ours.endswith("_scale"):
                continue
            m = model.get_submodule(module)
            why = f"the config's quantization_bit={hub.bits}"
            _check(key, t, hub.weight_shape(m.out_features, m.in_features), torch.int8, why)
            _check(key + "_scale", state[key + "_scale"], (m.out_features,), None, why)
            scheme = QuantScheme(m.bits, m.group_size)
            out[ours], out[ours + "_scale"] = hub.to_runtime(t, state[key + "_scale"], scheme)
        else:
            # a glmkit-quantized checkpoint's integer tensors are exact; float ones may be any float dtype
            _check(key, t, tuple(exp.shape), None if exp.is_floating_point() else exp.dtype, "the config")
            out[ours] = t
    return out


def read_config(path: str | Path, **config_overrides: Any) -> Any:
    """The model config of the ChatGLM hub folder ``path`` (any generation), as ``load_pretrained`` parses it; a
    ``ConfigError`` names the file and the field."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no config.json")
    d = read_json_object(config_path)
    try:
        return family_of(d).config_from_hub(d, **config_overrides)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from e


def load_pretrained(
    path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", **config_overrides: Any
) -> nn.Module:
    """Load a ChatGLM-family checkpoint folder (any generation, float or quantized) in eval mode.

    ``dtype`` casts the float tensors (default: as stored); the fp16 scales of a hub int4/int8 checkpoint are kept
    exactly (in fp32) whatever ``dtype`` is. ``config_overrides`` replace config fields."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    d = read_json_object(config_path)
    try:
        family = family_of(d)
        config = family.config_from_hub(d, **config_overrides)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from e
    hub = _hub_quantization(d, config_path)
    scheme = read_quantization(folder)
    if hub is not None and scheme is not None:
        raise ConfigError(f"{config_path}: both quantization_bit and {METADATA_KEY} are set; expected one format")
    with torch.device("meta"):
        model = family.model(config)
    if hub is not None:
        _swap_for_hub(model, hub)
    elif scheme is not None:
        convert_for_runtime(model, scheme)
    state = _rename(load_state_dict(folder), family, config, model, hub)
    exact = {k for k in state if hub is not None and k.endswith("weight_scale")}
    state = {
        k: v.to(device=device, dtype=dtype if dtype and v.is_floating_point() and k not in exact else v.dtype)
        for k, v in state.items()
    }
    interleave_state_(model, state)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


# ---- saving ---------------------------------------------------------------------------------------------------


def _family_of_model(model: nn.Module) -> Family:
    for f in FAMILIES:
        if isinstance(model, f.model):
            return f
    raise TypeError(f"{type(model).__name__} is not a ChatGLM-family model (known: {[f.name for f in FAMILIES]})")


def _as_hub(model: nn.Module, state: dict[str, torch.Tensor]) -> HubQuantization | None:
    """The hub format that holds ``model``'s quantized weights exactly, converting ``state`` in place; None (and
    ``state`` untouched) when only glmkit's format does."""
    scheme = scheme_of(model)
    layers = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if scheme is None or scheme.embeddings or layers != set(_layer_linears(model)):
        return None
    hub = HubQuantization(scheme.bits)
    converted = {}
    for n in layers:
        pair = hub.from_runtime(state[n + ".weight"], state[n + ".weight_scale"], scheme)
        if pair is None:
            return None
        converted[n + ".weight"], converted[n + ".weight_scale"] = pair
    state.update(converted)
    return hub


def save_pretrained(model: nn.Module, path: str | Path, max_shard_size: int | None = None) -> None:
    """Write ``model`` in its family's hub layout, atomically: ``config.json`` + ``model.safetensors`` under hub key
    names, or shards of at most ``max_shard_size`` bytes (``model-0000k-of-0000n.safetensors``) with
    ``model.safetensors.index.json``. A quantized model is written in the hub format (``quantization_bit``) when
    that holds its weights exactly (one scale per row: e.g. a loaded hub int4 checkpoint), else in glmkit's
    (``glmkit_quantization`` in config.json and every header). Other files in an existing folder are kept."""
    family = _family_of_model(model)
    names = {ours: hub for hub, ours in family.hub_names(model.config).items()}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    hub_config = model.config.to_hub_dict()
    hub_config["torch_dtype"] = str(model.wte.weight.dtype).removeprefix("torch.")  # what the hub code casts to
    metadata = {"format": "pt"}
    hub = _as_hub(model, state)
    scheme = scheme_of(model)
    if hub is not None:
        hub_config["quantization_bit"] = hub.bits
    elif scheme is not None:
        hub_config[METADATA_KEY] = scheme.to_dict()
        metadata[METADATA_KEY] = json.dumps(scheme.to_dict())
    for ours in list(state):
        if ours.endswith(".weight_scale"):
            names[ours] = names[ours.removesuffix("_scale")] + "_scale"
    tensors = {names[k]: v for k, v in state.items()}
    dest = Path(path)
    with staged_folder(dest, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(hub_config, indent=2) + "\n")
        _write_shards(tensors, tmp, metadata, max_shard_size)
        if dest.is_dir():
            stale = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
            for f in dest.iterdir():  # keep what else lives there (tokenizer files, README), not old weights
                old_weights = f.name in stale or f.name.startswith(("model-", "pytorch_model"))
                if not (tmp / f.name).exists() and not old_weights:
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)


def _write_shards(
    tensors: dict[str, torch.Tensor], folder: Path, metadata: dict[str, str], max_shard_size: int | None
) -> None:
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    if max_shard_size is None or sum(sizes.values()) <= max_shard_size:
        save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for k, v in tensors.items():  # in model order, as transformers shards
        if shards[-1] and used + sizes[k] > max_shard_size:
            shards.append({})
            used = 0
        shards[-1][k] = v
        used += sizes[k]
    n = len(shards)
    width = max(5, math.ceil(math.log10(n + 1)))
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:0{width}d}-of-{n:0{width}d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
