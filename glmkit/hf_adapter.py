"""A thin transformers wrapper around a glmkit ``GLM``, so ``transformers.generate()`` and pipelines can run it.

Why: it is the independent check of glmkit's own engine. The wrapper knows nothing of glmkit's decoding code; it
only turns transformers' ``input_ids`` + 2D padding mask into GLM's 2D positions and prefix-LM mask and
recomputes the whole sequence every step (no cache, so it also checks the engine's KV-cache path). A row is
``[pad...] Part A <sop> generated...``: Part A up to the first ``<sop>`` is bidirectional with positions 0..L-1;
the span sits at the first blank's position with block positions 1, 2, ... (the hub ``build_inputs_for_generation``
layout). Needs transformers >= 5.24 (dataclass configs; beam sampling semantics).

The ChatGLM families are wrapped the same way, each in its hub class's conventions: ChatGLM-6B gets the same 2D
layout (its Part A is ``text [gMASK]``, no [CLS]) with its mask inverted (the hub's True = masked); ChatGLM2/3 and
GLM-4 are causal LMs that take transformers' 2D padding mask as they are (their ``forward`` derives the positions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .chatglm.v1 import ChatGLM6B, ChatGLM6BConfig
from .chatglm.v2 import ChatGLM2, ChatGLM2Config
from .config import GLMConfig, SpecialTokens
from .masks import find_blanks, part_b_positions, prefix_lm_mask
from .model import GLM
from .prompts import DEFAULT_FAMILY, layout, model_family, model_stop_ids

# family -> (model class, config class) a saved wrapper is rebuilt from
MODELS: dict[str, tuple[type[torch.nn.Module], type]] = {
    DEFAULT_FAMILY: (GLM, GLMConfig),
    "chatglm6b": (ChatGLM6B, ChatGLM6BConfig),
    "chatglm2": (ChatGLM2, ChatGLM2Config),
}


class GLMHFConfig(PretrainedConfig):
    """transformers config holding a glmkit model config (as a dict), its family and the special token ids."""

    model_type = "glmkit_glm"
    glm_config: dict | None = None
    special_tokens: dict | None = None
    glmkit_family: str = DEFAULT_FAMILY
    use_cache: bool = False


def glm_layout(
    input_ids: torch.Tensor, padding_mask: torch.Tensor | None, special: SpecialTokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM ``position_ids [B, 2, T]`` and boolean mask ``[B, 1, T, T]`` for padded ``Part A <sop> span`` rows.

    Padding (``padding_mask == 0``, either side) gets position (0, 0) and is never attended.
    """
    B, T = input_ids.shape
    device = input_ids.device
    keep = padding_mask.bool() if padding_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    positions = torch.zeros(B, 2, T, dtype=torch.long, device=device)
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool, device=device)
    for b in range(B):
        where = keep[b].nonzero().squeeze(1)
        row = input_ids[b, where].tolist()
        sep = row.index(special.sop) if special.sop in row else len(row)
        pos, block = list(range(sep)), [0] * sep
        if sep < len(row):
            blanks = find_blanks(row[:sep], special.mask_ids())
            if not blanks:
                raise ValueError(f"input_ids: row {b} has a <sop> but no blank before it")
            span_pos, span_block = part_b_positions(blanks[0], len(row) - sep)
            pos, block = pos + span_pos, block + span_block
        positions[b, 0, where] = torch.tensor(pos, device=device)
        positions[b, 1, where] = torch.tensor(block, device=device)
        mask[b, 0, where[:, None], where[None, :]] = prefix_lm_mask(sep, len(row), device=device)[0, 0]
    return positions, mask


class GLMForHFGeneration(PreTrainedModel, GenerationMixin):
    """``PreTrainedModel`` + ``GenerationMixin`` over a glmkit ``GLM``; build it with ``from_glm``."""

    config_class = GLMHFConfig
    base_model_prefix = "glm"
    main_input_name = "input_ids"

    def __init__(self, config: GLMHFConfig, model: torch.nn.Module | None = None) -> None:
        super().__init__(config)
        family = getattr(config, "glmkit_family", DEFAULT_FAMILY)
        if family not in MODELS:
            raise ValueError(f"glmkit_family: unknown model family {family!r}; known: {sorted(MODELS)}")
        if model is None:
            model_cls, config_cls = MODELS[family]
            model = model_cls(config_cls(**config.glm_config))
        self.glm, self.family = model, family
        self.special = SpecialTokens.from_dict(config.special_tokens) if config.special_tokens else None
        self.post_init()

    @classmethod
    def from_glm(cls, model: torch.nn.Module, special_tokens: SpecialTokens | None = None) -> GLMForHFGeneration:
        """Wrap ``model`` (a ``GLM``, ``ChatGLM6B`` or ``ChatGLM2``; weights shared, not copied). Stop ids default to
        the model's (``glmkit.prompts.model_stop_ids``: GLM ``[<eop>, <eos>]``), pad to pad. A ChatGLM2/3/GLM-4
        model needs no special ids (its config names its eos and pad ids)."""
        family = model_family(model)
        special = special_tokens or model.config.special_tokens
        if special is None and family != "chatglm2":
            raise ValueError("special_tokens: the model config names no special tokens; pass special_tokens=")
        if special is None:
            eos, pad = model.config.eos_ids, model.config.pad_token_id
        else:
            eos, pad = model_stop_ids(model, layout(special, family)), special.pad
        config = GLMHFConfig(
            glm_config=dataclasses.asdict(model.config),
            special_tokens=special.to_dict() if special is not None else None,
            glmkit_family=family,
            eos_token_id=eos,
            pad_token_id=pad,
            vocab_size=model.config.vocab_size,
        )
        wrapper = cls(config, model)
        wrapper.generation_config.use_cache = False
        return wrapper.to(next(model.parameters()).device).eval()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The wrapped GLM is initialised (or loaded) by glmkit; nothing to do here."""

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Recompute the whole sequence every step with its GLM 2D positions and prefix-LM mask (a causal family:
        transformers' padding mask as it is)."""
        if self.family == "chatglm2":
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        position_ids, mask = glm_layout(input_ids, attention_mask, self.special)
        return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for ``input_ids``; a 2D (or missing) ``attention_mask`` is turned into the GLM layout first (a
        causal family derives its positions and mask from it itself)."""
        if self.family == "chatglm2":
            return CausalLMOutputWithPast(logits=self.glm(input_ids, position_ids, attention_mask))
        if position_ids is None or attention_mask is None or attention_mask.dim() == 2:
            position_ids, attention_mask = glm_layout(input_ids, attention_mask, self.special)
        if self.family == "chatglm6b":  # the hub class's mask: True = masked
            attention_mask = ~attention_mask
        return CausalLMOutputWithPast(logits=self.glm(input_ids, position_ids, attention_mask))


# so pipelines and ``AutoModelForCausalLM`` know the wrapper (a saved wrapper reloads with ``from_pretrained``)
AutoConfig.register(GLMHFConfig.model_type, GLMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(GLMHFConfig, GLMForHFGeneration, exist_ok=True)
