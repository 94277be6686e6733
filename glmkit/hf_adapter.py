"""A thin transformers wrapper around a glmkit ``GLM``, so ``transformers.generate()`` and pipelines can run it.

Why: it is the independent check of glmkit's own engine. The wrapper knows nothing of glmkit's decoding code; it
only turns transformers' ``input_ids`` + 2D padding mask into GLM's 2D positions and prefix-LM mask and
recomputes the whole sequence every step (no cache, so it also checks the engine's KV-cache path). A row is
``[pad...] Part A <sop> generated...``: Part A up to the first ``<sop>`` is bidirectional with positions 0..L-1;
the span sits at the first blank's position with block positions 1, 2, ... (the hub ``build_inputs_for_generation``
layout). Needs transformers >= 5.24 (dataclass configs; beam sampling semantics).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import GLMConfig, SpecialTokens
from .masks import find_blanks, part_b_positions, prefix_lm_mask
from .model import GLM
from .prompts import layout


class GLMHFConfig(PretrainedConfig):
    """transformers config holding a glmkit ``GLMConfig`` (as a dict) and the GLM special token ids."""

    model_type = "glmkit_glm"
    glm_config: dict | None = None
    special_tokens: dict | None = None
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

    def __init__(self, config: GLMHFConfig, model: GLM | None = None) -> None:
        super().__init__(config)
        self.glm = model if model is not None else GLM(GLMConfig(**config.glm_config))
        self.special = SpecialTokens.from_dict(config.special_tokens)
        self.post_init()

    @classmethod
    def from_glm(cls, model: GLM, special_tokens: SpecialTokens | None = None) -> GLMForHFGeneration:
        """Wrap ``model`` (weights shared, not copied). Stop ids default to the prompt layout's (``[<eop>, <eos>]``),
        pad to pad."""
        special = special_tokens or model.config.special_tokens
        if special is None:
            raise ValueError("special_tokens: the model config names no special tokens; pass special_tokens=")
        glm_config = dataclasses.asdict(model.config)
        config = GLMHFConfig(
            glm_config=glm_config,
            special_tokens=special.to_dict(),
            eos_token_id=layout(special).stop_ids(),
            pad_token_id=special.pad,
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
        """Recompute the whole sequence every step with its GLM 2D positions and prefix-LM mask."""
        position_ids, mask = glm_layout(input_ids, attention_mask, self.special)
        return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for ``input_ids``; a 2D (or missing) ``attention_mask`` is turned into the GLM layout first."""
        if position_ids is None or attention_mask is None or attention_mask.dim() == 2:
            position_ids, attention_mask = glm_layout(input_ids, attention_mask, self.special)
        return CausalLMOutputWithPast(logits=self.glm(input_ids, position_ids, attention_mask))


# so pipelines and ``AutoModelForCausalLM`` know the wrapper (a saved wrapper reloads with ``from_pretrained``)
AutoConfig.register(GLMHFConfig.model_type, GLMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(GLMHFConfig, GLMForHFGeneration, exist_ok=True)
