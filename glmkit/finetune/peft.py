"""Parameter-efficient fine-tuning: LoRA through the ``peft`` library, and P-tuning v2 prefixes.

LoRA (Hu et al. 2021) adds ``B A · alpha / r`` beside chosen linear layers; ``add_lora`` injects peft's LoRA layers
into a glmkit model (GLM, ChatGLM-6B, ChatGLM2/3/GLM-4: their blocks share the names ``attn.qkv``, ``attn.proj``,
``mlp.fc``, ``mlp.proj``) in place and returns peft's ``PeftModel``, so everything peft offers (several adapters,
``save_pretrained``, ``merge_and_unload``) works as documented there. The model passed in keeps the LoRA layers, so
``glmkit.generate`` and ``batch_loss`` run it directly. ``merge_lora`` folds the adapters into the weights and gives
back the plain model that ``glmkit generate`` / ``serve`` and the fused decode step run. Adapter checkpoints are
peft's own folders (``adapter_config.json`` + ``adapter_model.safetensors``, adapter tensors only).

QLoRA-style (Dettmers et al. 2023): a model quantized first (``glmkit.quantize.quantize_model``, INT8 or INT4) can
be the frozen base. glmkit's integer kernels have no backward; when autograd needs the input's gradient the
quantized layers run the reference instead (dequantize, then ``F.linear``: glmkit/kernels/ops.py), so training
goes through that path and decoding through the kernels. Merging into an integer layer re-quantizes base + update
(as peft does for bitsandbytes' 4-bit layers): one rounding of the merged weight.

P-tuning v2 prefixes (``add_prefix``, ``save_prefix``, ``load_prefix``: GLM, ChatGLM-6B, ChatGLM2/3/GLM-4) live in
prefix.py and are importable from here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn as nn
from peft.tuners.lora.layer import LoraLayer

from ..chatglm.v1 import ChatGLM6B
from ..chatglm.v2 import ChatGLM2
from ..checkpoint import CheckpointError
from ..kernels.reference import deinterleave_int4, dequantize_int4, dequantize_int8
from ..model import GLM
from ..quantize.modules import QuantizedEmbedding, QuantizedLinear
from .prefix import PrefixTunedChatGLM6B, PrefixTunedGLM, add_prefix, load_prefix, save_prefix

__all__ = [
    "DEFAULT_TARGETS",
    "ParameterCount",
    "PrefixTunedChatGLM6B",
    "PrefixTunedGLM",
    "QuantizedLoraLinear",
    "add_lora",
    "add_prefix",
    "count_parameters",
    "load_adapter",
    "load_prefix",
    "merge_lora",
    "save_adapter",
    "save_prefix",
]

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
"""Every linear layer of every block (the QLoRA paper finds all of them needed to match full fine-tuning)."""


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int
    """Every weight, an integer one counted by its logical size (a quantized base's frozen weights)."""

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.trainable / self.total:.3f} %)"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts of ``model``."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():  # integer weights are buffers, not parameters
        if isinstance(m, QuantizedLinear):
            total += m.in_features * m.out_features
        elif isinstance(m, QuantizedEmbedding):
            total += m.num_embeddings * m.embedding_dim
    return ParameterCount(trainable, total)


# ---- LoRA ----------------------------------------------------------------------------------------------------


def _dequantized(layer: QuantizedLinear) -> torch.Tensor:
    """The fp32 weight ``[out, in]`` an integer layer multiplies with."""
    w, s = layer.weight, layer.weight_scale
    if layer.bits == 8:
        return dequantize_int8(w, s)
    if layer.interleaved:
        w, s = deinterleave_int4(w, s)
    return dequantize_int4(w, s, layer.group_size)


class QuantizedLoraLinear(nn.Module, LoraLayer):
    """peft's LoRA beside a ``glmkit.quantize.QuantizedLinear`` (registered with ``LoraConfig._register_custom_module``,
    peft's route for layer types it does not know). The base stays integer and frozen."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: peft.LoraConfig, **kwargs: Any) -> None:
        if config.use_dora:
            raise ValueError("use_dora: DoRA is not supported on glmkit's quantized layers; use plain LoRA")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        r, alpha = kwargs.pop("r"), kwargs.pop("lora_alpha")
        self.update_layer(adapter_name, r, lora_alpha=alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            update = b(a(self.lora_dropout[name](x.to(a.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Re-quantize base + update with the layer's own scheme (one rounding of the merged weight)."""
        names = [n for n in (adapter_names or self.active_adapters) if n in self.lora_A]
        if not names:
            return
        base = self.get_base_layer()
        weight = _dequantized(base) + sum(self.get_delta_weight(n) for n in names)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"merge: adapters {names} give non-finite weights")
        base.set_from(weight)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        raise ValueError("unmerge: a merge into integer weights re-quantized them; reload the base to undo it")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers LoRA can target: float and integer linear layers (not peft's own)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, QuantizedLinear)) and not any(p in n.split(".") for p in ("lora_A", "lora_B"))
    }


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target must match a linear layer by name or name suffix (peft's rule); name the one that does not."""
    layers = _lora_layers(model)
    known = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in layers})
    if not targets:
        raise ValueError(f"targets: none given; {type(model).__name__}'s linear layers are {known}")
    for t in targets:
        hits = [(n, m) for n, m in model.named_modules() if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"targets: {t!r} matches no module of {type(model).__name__}; its linear layers: {known}")
        wrong = [(n, m) for n, m in hits if n not in layers and not isinstance(m, LoraLayer)]
        if wrong:
            n, m = wrong[0]
            raise ValueError(
                f"targets: {t!r} matches {n} ({type(m).__name__}), not a linear layer; LoRA targets: {known}"
            )


def _lora_config(targets: list[str], r: int, alpha: float, dropout: float, **kwargs: Any) -> peft.LoraConfig:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r: the LoRA rank must be a positive int, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"alpha: must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), **kwargs)
    config._register_custom_module({QuantizedLinear: QuantizedLoraLinear})
    return config


def add_lora(
    model: nn.Module,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    **lora_options: Any,
) -> peft.PeftModel:
    """Inject trainable LoRA adapters into ``model``'s ``targets`` (in place) and freeze everything else.

    Args:
        model: a glmkit GLM or ChatGLM model, float or quantized (QLoRA-style: quantize first, then add LoRA).
        targets: linear layers by name or name suffix (``"attn.qkv"`` targets every block's); each must match
            one, else a ``ValueError`` names it. ChatGLM's untied ``lm_head`` may be targeted too.
        r, alpha, dropout: rank, scale numerator (updates are scaled by ``alpha / r``) and dropout on the
            adapter's input.
        lora_options: further ``peft.LoraConfig`` fields (``use_rslora``, ``init_lora_weights`` ...).

    Returns peft's ``PeftModel`` around ``model`` (``count_parameters`` reports what trains).
    """
    if not isinstance(model, (GLM, ChatGLM2, ChatGLM6B)):
        raise TypeError(f"model: expected a glmkit GLM or ChatGLM model, got {type(model).__name__}")
    targets = [targets] if isinstance(targets, str) else list(targets)
    _check_targets(model, targets)
    return peft.get_peft_model(model, _lora_config(targets, r, alpha, dropout, **lora_options))


def merge_lora(model: peft.PeftModel) -> nn.Module:
    """Fold the adapters into the base weights and return the plain glmkit model, LoRA layers gone: what
    ``save_pretrained``, ``glmkit generate`` / ``serve`` and the fused decode step take."""
    if not isinstance(model, peft.PeftModel):
        raise TypeError(f"model: expected the PeftModel add_lora or load_adapter returned, got {type(model).__name__}")
    return model.merge_and_unload()


def save_adapter(model: peft.PeftModel, folder: str | Path) -> None:
    """Write the adapters only (``adapter_model.safetensors`` + ``adapter_config.json``, peft's layout)."""
    if not isinstance(model, peft.PeftModel):
        raise TypeError(f"model: expected the PeftModel add_lora returned, got {type(model).__name__}")
    model.save_pretrained(str(folder), save_embedding_layers=False)  # glmkit adapters never train embeddings


def load_adapter(model: nn.Module, folder: str | Path, trainable: bool = False) -> peft.PeftModel:
    """Put the LoRA adapter saved in ``folder`` onto the base ``model`` (in place); ``trainable`` to go on training."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (not an adapter folder written by save_adapter)")
    config = peft.PeftConfig.from_pretrained(str(folder))
    if not isinstance(config, peft.LoraConfig):
        raise CheckpointError(f"{folder}: a {config.peft_type} adapter; glmkit loads LoRA adapters")
    targets = config.target_modules
    _check_targets(model, [targets] if isinstance(targets, str) else sorted(targets))
    config._register_custom_module({QuantizedLinear: QuantizedLoraLinear})
    try:
        return peft.PeftModel.from_pretrained(model, str(folder), config=config, is_trainable=trainable)
    except RuntimeError as e:  # torch's report lists every mismatched tensor: name the first
        lines = [line.strip() for line in str(e).splitlines() if "mismatch" in line] or [str(e)]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        why = lines[0].replace("base_model.model.", "")
        raise CheckpointError(f"{folder}: the adapter does not fit this model: {why}{more}") from e
