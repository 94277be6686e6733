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

P-tuning v2 (Liu et al. 2022; THUDM/ChatGLM-6B ``ptuning/``): ``pre_seq_len`` learned keys and values in front of
every layer's, from a ``prefix_encoder`` embedding ``[pre_seq_len, n_layer · 2 · kv heads · head_size]`` laid out
``[layer, k|v, head, dim]`` (the hub ``PrefixEncoder``, glmkit/chatglm/v2.py, reused here). ChatGLM2/3/GLM-4 carry
it in the model (hub.py loads checkpoints that hold it); a GLM is wrapped (``PrefixTunedGLM``), which hands the
prefix to attention through the KV-cache interface, so training, ``glmkit.generate`` and a cache filled by earlier
steps all see it. ``save_prefix`` / ``load_prefix`` read and write the released P-tuning checkpoints' layout:
``transformer.prefix_encoder.*`` tensors only, with a ``config.json`` naming ``pre_seq_len``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn as nn
from peft.tuners.lora.layer import LoraLayer
from safetensors.torch import save_file

from ..chatglm.v1 import ChatGLM6B
from ..chatglm.v2 import ChatGLM2, PrefixEncoder
from ..checkpoint import CheckpointError, load_state_dict, staged_folder
from ..kernels.reference import deinterleave_int4, dequantize_int4, dequantize_int8
from ..model import GLM
from ..quantize.modules import QuantizedEmbedding, QuantizedLinear

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
"""Every linear layer of every block (the QLoRA paper finds all of them needed to match full fine-tuning)."""

PREFIX_KEY = "prefix_encoder."  # ChatGLM's P-tuning checkpoints: transformer.prefix_encoder.<tensor>


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


# ---- P-tuning v2 prefixes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefixShape:
    """What ``chatglm.v2.PrefixEncoder`` reads from a config: the prefix length and the model's KV shape."""

    pre_seq_len: int
    n_layer: int
    n_kv_head: int
    head_size: int
    n_embd: int
    prefix_projection: bool = False


class _PrefixedCache:
    """A prefix's keys/values in front of every layer's, then those of ``inner`` (the caller's ``KVCache`` or rows
    of one; None for a pass without cache). GLM's attention reads it like a cache that already holds the prefix,
    so the prefix is visible to every token and takes no position; ``inner`` stores only the text's keys."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], inner: Any, batch: int) -> None:
        self.prefix, self.inner, self.batch_size = prefix, inner, batch

    def host_lengths(self) -> list[int]:
        return [self.prefix[0][0].shape[2] + n for n in _cached_lengths(self.inner, self.batch_size)]

    def check_room(self, new_tokens: int) -> None:
        if self.inner is not None:
            self.inner.check_room(new_tokens)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            k, v = self.inner.write(layer, k, v)
        pk, pv = self.prefix[layer]
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)

    def advance(self, new_tokens: int) -> None:
        if self.inner is not None:
            self.inner.advance(new_tokens)


def _cached_lengths(cache: Any, batch: int) -> list[int]:
    """Tokens each row of ``cache`` holds: none for no cache or one that keeps nothing (``PassThroughCache``, the
    scoring pass, which has no lengths)."""
    return cache.host_lengths() if hasattr(cache, "host_lengths") else [0] * batch


def _check_prefix_length(pre_seq_len: int, context: int, what: str) -> None:
    if isinstance(pre_seq_len, bool) or not isinstance(pre_seq_len, int) or pre_seq_len <= 0:
        raise ValueError(f"pre_seq_len: expected a positive int, got {pre_seq_len!r}")
    if pre_seq_len >= context:
        raise ValueError(
            f"pre_seq_len: a prefix of {pre_seq_len} tokens overflows the context of {context} ({what}), leaving no "
            f"room for text; at most {context - 1}"
        )


class PrefixTunedGLM(nn.Module):
    """A GLM with a P-tuning v2 prefix: ``forward`` takes ``GLM.forward``'s arguments (so ``batch_loss`` and
    ``glmkit.generate`` run it), and the prefix's keys/values sit in front of every layer's through the cache.
    Prefix plus text must fit the context: ``n_positions`` (max_sequence_length + 1), the positions a GLM text
    takes (its Part A; Part B and padding reuse them)."""

    def __init__(self, model: GLM, pre_seq_len: int, prefix_projection: bool = False) -> None:
        super().__init__()
        c = model.config
        _check_prefix_length(pre_seq_len, c.n_positions, "max_sequence_length + 1")
        self.model = model  # registered first: generation takes the model's dtype from its first parameter
        shape = PrefixShape(pre_seq_len, c.n_layer, c.n_head, c.head_size, c.n_embd, prefix_projection)
        p = next(model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        self.prefix_encoder = PrefixEncoder(shape).to(p.device, dtype)
        self._text_config = dataclasses.replace(c, max_sequence_length=c.max_sequence_length - pre_seq_len)

    @property
    def config(self):
        """The model's config with the context left to text (``max_sequence_length`` less the prefix), so every
        caller that fits a text to ``config.n_positions`` (generation, serving, scoring) leaves the prefix room."""
        return self._text_config

    @property
    def pre_seq_len(self) -> int:
        return self.prefix_encoder.config.pre_seq_len

    @property
    def wte(self) -> nn.Module:  # what callers that run the model's own LM head take (serve's Scorer)
        return self.model.wte

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        cache: Any = None,
        return_hidden: bool = False,
        logits_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``GLM.forward`` with the prefix visible to every token; positions count the text only (default
        ``arange`` after the cached text). A full-width mask covers the cached text, not the prefix."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [B, S], got {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        cached = _cached_lengths(cache, B)
        if position_ids is None:
            if min(cached) != max(cached):
                raise ValueError("position_ids: needed for rows that hold different numbers of cached tokens")
            pos = torch.arange(cached[0], cached[0] + S, device=input_ids.device)
            position_ids = torch.stack([pos, torch.zeros_like(pos)])[None].expand(B, 2, S)
        # GLM's context is its position table: Part A takes positions, Part B and padding reuse them
        P, context, extent = self.pre_seq_len, self.model.config.n_positions, int(position_ids[:, 0].max()) + 1
        if P + extent > context:
            raise ValueError(
                f"pre_seq_len: the prefix of {P} tokens and a text of {extent} positions overflow the context of "
                f"{context} (max_sequence_length + 1); shorten the text or the prefix"
            )
        m = attention_mask
        if isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[-1] == max(cached) + S != S:
            attention_mask = torch.cat([m.new_ones(*m.shape[:3], P), m], dim=-1)
        prefix = self.prefix_encoder(B, self.prefix_encoder.embedding.weight.dtype)
        return self.model(
            input_ids,
            position_ids,
            attention_mask,
            cache=_PrefixedCache(prefix, cache, B),
            return_hidden=return_hidden,
            logits_mask=logits_mask,
        )


def _freeze_all_but_prefix(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("prefix_encoder."))


def add_prefix(model: nn.Module, pre_seq_len: int, projection: bool = False) -> nn.Module:
    """A trainable P-tuning v2 prefix of ``pre_seq_len`` tokens on a frozen ``model``.

    A GLM comes back wrapped (``PrefixTunedGLM``); a ChatGLM2/3/GLM-4 model gets the hub's own ``prefix_encoder``
    (its config's ``pre_seq_len``) and comes back itself. ``projection``: the hub's ``prefix_projection`` (the
    embedding goes through a two-layer tanh MLP). The prefix is initialised N(0, 1), as the hub's embedding is."""
    if isinstance(model, GLM):
        out = PrefixTunedGLM(model, pre_seq_len, projection)
    elif isinstance(model, ChatGLM2):
        _check_prefix_length(pre_seq_len, model.config.seq_length, "seq_length")
        model.config = dataclasses.replace(model.config, pre_seq_len=pre_seq_len, prefix_projection=projection)
        p = model.wte.weight
        model.prefix_encoder = PrefixEncoder(model.config).to(p.device, p.dtype if p.is_floating_point() else None)
        out = model
    elif isinstance(model, ChatGLM6B):
        raise TypeError("model: P-tuning v2 prefixes are not supported on ChatGLM-6B yet; use add_lora")
    else:
        raise TypeError(f"model: expected a glmkit GLM or ChatGLM2/3/GLM-4 model, got {type(model).__name__}")
    _freeze_all_but_prefix(out)
    return out


def save_prefix(model: nn.Module, folder: str | Path) -> None:
    """Write the prefix only, as ChatGLM's P-tuning checkpoints hold it: ``model.safetensors`` with
    ``transformer.prefix_encoder.*`` and a ``config.json`` with ``pre_seq_len`` and ``prefix_projection``."""
    encoder = getattr(model, "prefix_encoder", None)
    if not isinstance(encoder, PrefixEncoder):
        raise TypeError(f"model: {type(model).__name__} has no P-tuning prefix (add_prefix or load_prefix adds one)")
    state = {f"transformer.{PREFIX_KEY}{k}": v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    config = {"pre_seq_len": encoder.config.pre_seq_len, "prefix_projection": encoder.config.prefix_projection}
    with staged_folder(folder, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})


def load_prefix(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the P-tuning v2 prefix saved in ``folder`` (``save_prefix``, or a released ChatGLM P-tuning checkpoint:
    ``pytorch_model.bin`` holding ``transformer.prefix_encoder.*`` only) on ``model``; returns the prefixed model
    as ``add_prefix`` does, frozen but for the prefix. Shapes are checked against the model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"prefix folder {folder} does not exist")
    state = {k.split(PREFIX_KEY, 1)[1]: v for k, v in load_state_dict(folder).items() if PREFIX_KEY in k}
    if "embedding.weight" not in state:
        raise CheckpointError(f"{folder}: no prefix_encoder.embedding.weight (not a P-tuning v2 checkpoint)")
    pre_seq_len, projection = state["embedding.weight"].shape[0], any(k.startswith("trans.") for k in state)
    if (folder / "config.json").is_file():
        declared = json.loads((folder / "config.json").read_text()).get("pre_seq_len")
        if declared not in (None, pre_seq_len):
            raise CheckpointError(f"{folder}: config.json says pre_seq_len={declared}, the weights hold {pre_seq_len}")
    base = model.model if isinstance(model, PrefixTunedGLM) else model
    out = add_prefix(base, pre_seq_len, projection)
    encoder = out.prefix_encoder
    expected = encoder.state_dict()
    for k, v in state.items():
        if k not in expected or v.shape != expected[k].shape:
            want = tuple(expected[k].shape) if k in expected else "no such tensor"
            raise CheckpointError(
                f"{folder}: prefix_encoder.{k} {tuple(v.shape)} does not fit this model (expected {want}: the "
                "prefix holds n_layer · 2 · KV heads · head_size values per token)"
            )
    encoder.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return out
