"""glmkit models as transformers ``PreTrainedModel``s: the base (``AutoModel``), the generation wrapper
(``AutoModelForCausalLM``) and, in heads.py, the classification and multiple-choice heads.

Every class holds a glmkit model as ``self.glm`` and turns transformers' ``input_ids`` + 2D padding mask into GLM's
2D positions and prefix-LM mask (``glm_layout``), so padding on either side never changes a row's result. A GLM
checkpoint folder stores THUDM's hub tensor names (``glm.word_embeddings.weight``, ``glm.transformer.layers.0...``);
the renaming registered below maps them to glmkit's module names when transformers loads a folder and back when it
saves one, so the Auto classes read glmkit's (and the hub's) GLM folders, and what they save glmkit reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from ..chatglm.v1 import ChatGLM6B, ChatGLM6BConfig
from ..chatglm.v2 import ChatGLM2, ChatGLM2Config
from ..config import GLMConfig, SpecialTokens
from ..masks import find_blanks, part_b_positions, prefix_lm_mask
from ..model import GLM
from ..prompts import DEFAULT_FAMILY, GLMPrompts, layout, model_family, model_stop_ids
from .config import GLMHFConfig

# family -> (model class, config class) a wrapper is rebuilt from
MODELS: dict[str, tuple[type[torch.nn.Module], type]] = {
    DEFAULT_FAMILY: (GLM, GLMConfig),
    "chatglm6b": (ChatGLM6B, ChatGLM6BConfig),
    "chatglm2": (ChatGLM2, ChatGLM2Config),
}


def glm_layout(
    input_ids: torch.Tensor,
    padding_mask: torch.Tensor | None,
    special: SpecialTokens | None,
    n_positions: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM ``position_ids [B, 2, T]`` and boolean mask ``[B, 1, T, T]`` for padded ``Part A <sop> span`` rows.

    Padding (``padding_mask == 0``, either side) gets position (0, 0) and is never attended. Without ``special``
    every row is Part A. ``n_positions``: the model's position count; a longer Part A raises ``ValueError``.
    """
    B, T = input_ids.shape
    device = input_ids.device
    keep = padding_mask.bool() if padding_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    positions = torch.zeros(B, 2, T, dtype=torch.long, device=device)
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool, device=device)
    for b in range(B):
        where = keep[b].nonzero().squeeze(1)
        row = input_ids[b, where].tolist()
        sep = row.index(special.sop) if special is not None and special.sop in row else len(row)
        if n_positions is not None and sep > n_positions:
            raise ValueError(
                f"input_ids: row {b} holds {sep} tokens, more than the model's context of {n_positions} positions "
                "(max_sequence_length + 1); truncate it (tokenizer(..., truncation=True) cuts at the context)"
            )
        pos, block = list(range(sep)), [0] * sep
        if sep < len(row):
            blanks = find_blanks(row[:sep], special.mask_ids())
            if not blanks:
                raise ValueError(f"input_ids: row {b} has a <sop> but no blank before it")
            span_pos, span_block = part_b_positions(blanks[0], len(row) - sep)
            pos, block = pos + span_pos, block + span_block
        positions[b, 0, where] = torch.tensor(pos, dtype=torch.long, device=device)
        positions[b, 1, where] = torch.tensor(block, dtype=torch.long, device=device)
        mask[b, 0, where[:, None], where[None, :]] = prefix_lm_mask(sep, len(row), device=device)[0, 0]
    return positions, mask


class GLMHFPreTrainedModel(PreTrainedModel):
    """What every glmkit transformers class shares: the glmkit model as ``self.glm``, its family and special ids,
    and the padded batch → GLM layout step. A subclass adds its head in ``build_head``."""

    config_class = GLMHFConfig
    base_model_prefix = "glm"
    main_input_name = "input_ids"
    # leftover head tensors of some hub GLM checkpoints (THUDM/GLM#178) and P-tuning weights: not the LM's
    _keys_to_ignore_on_load_unexpected = [r"^(glm\.)?(dense|out_proj|pool_layer|multichoice_head|prompt_spell)\."]

    def __init__(self, config: GLMHFConfig, model: torch.nn.Module | None = None) -> None:
        super().__init__(config)
        family = config.glmkit_family
        if family not in MODELS:
            raise ValueError(f"glmkit_family: unknown model family {family!r}; known: {sorted(MODELS)}")
        self.glm = model if model is not None else MODELS[family][0](config.model_config())
        self.family = family
        self.special = config.special()
        self.build_head(config)
        self.post_init()

    def build_head(self, config: GLMHFConfig) -> None:
        """Add the modules a task needs on top of ``self.glm`` (none for the base and the LM)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``, except that a folder lacking any of the wrapped model's weights
        raises ``ValueError`` naming them (transformers would start them from random values, a task head's aside)."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info["missing_keys"] if k.startswith(f"{cls.base_model_prefix}."))
        if missing:
            raise ValueError(
                f"{pretrained_model_name_or_path}: {len(missing)} weight(s) of the model are not in the checkpoint, "
                f"e.g. {missing[:4]}; is it a GLM folder written by glmkit (or the THUDM hub)?"
            )
        return (model, info) if wants_info else model

    @classmethod
    def from_glm(cls, model: torch.nn.Module, special_tokens: SpecialTokens | None = None, **config_kwargs: Any):
        """Wrap a glmkit ``GLM`` (weights shared, not copied); ``config_kwargs`` go to the config (``num_labels=``).
        ``special_tokens``: the ids when the model's config names none."""
        special = special_tokens or model.config.special_tokens
        config = GLMHFConfig.from_glm_config(dataclasses.replace(model.config, special_tokens=special), **config_kwargs)
        return cls(config, model).to(next(model.parameters()).device)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The wrapped model initialises itself (or is loaded); a head initialises its own modules."""

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states ``[B, S, C]`` of padded rows (``attention_mask`` 1 = token, 0 = padding)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [batch, length], got {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids' {tuple(input_ids.shape)}"
            )
        if attention_mask is not None and not attention_mask.bool().any(-1).all():
            raise ValueError("attention_mask: a row has no token (every position is padding)")
        positions, mask = glm_layout(input_ids, attention_mask, self.special, self.glm.config.n_positions)
        return self.glm(input_ids, positions, mask, return_hidden=True)


def first_tokens(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Index of each row's first token ([CLS] in GLM's layout), whichever side the row is padded on."""
    if attention_mask is None:
        return torch.zeros(shape[0], dtype=torch.long)
    return attention_mask.long().argmax(-1)


class GLMHFModel(GLMHFPreTrainedModel):
    """``AutoModel``: a GLM's final hidden states (after the last LayerNorm) for padded rows."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, return_dict: bool | None = None
    ) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.hidden_states(input_ids, attention_mask))


class GLMForHFGeneration(GLMHFPreTrainedModel, GenerationMixin):
    """``PreTrainedModel`` + ``GenerationMixin`` over a glmkit ``GLM``, ``ChatGLM6B`` or ``ChatGLM2``.

    Why: it is the independent check of glmkit's own engine. It knows nothing of glmkit's decoding code; it
    recomputes the whole sequence every step (no cache, so it also checks the engine's KV-cache path). A GLM row is
    ``[pad...] Part A <sop> generated...``: Part A up to the first ``<sop>`` is bidirectional with positions
    0..L-1; the span sits at the first blank's position with block positions 1, 2, ... (the hub
    ``build_inputs_for_generation`` layout). ``generate`` completes rows that lack the ``<sop>`` (what the tokenizer
    gives: ``[CLS] text <eos>``) by glmkit's prompt rule first. ChatGLM-6B gets the same 2D layout (its Part A is
    ``text [gMASK]``, no [CLS]) with its mask inverted (the hub's True = masked); ChatGLM2/3 and GLM-4 are causal
    LMs that take transformers' 2D padding mask as they are (their ``forward`` derives the positions).
    """

    @classmethod
    def from_glm(cls, model: torch.nn.Module, special_tokens: SpecialTokens | None = None) -> GLMForHFGeneration:
        """Wrap ``model`` (weights shared, not copied). Stop ids default to the model's
        (``glmkit.prompts.model_stop_ids``: GLM ``[<eop>, <eos>]``), pad to pad. A ChatGLM2/3/GLM-4 model needs no
        special ids (its config names its eos and pad ids)."""
        family = model_family(model)
        special = special_tokens or model.config.special_tokens
        if special is None and family != "chatglm2":
            raise ValueError("special_tokens: the model config names no special tokens; pass special_tokens=")
        if special is None:
            eos, pad = model.config.eos_ids, model.config.pad_token_id
        else:
            eos, pad = model_stop_ids(model, layout(special, family)), special.pad
        tokens = dict(eos_token_id=eos, pad_token_id=pad)
        if family == DEFAULT_FAMILY:
            config = GLMHFConfig.from_glm_config(dataclasses.replace(model.config, special_tokens=special), **tokens)
        else:
            config = GLMHFConfig(
                glm_config=dataclasses.asdict(model.config),
                special_tokens=special.to_dict() if special is not None else None,
                glmkit_family=family,
                vocab_size=model.config.vocab_size,
                **tokens,
            )
        wrapper = cls(config, model)
        return wrapper.to(next(model.parameters()).device).eval()

    def generation_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """GLM rows ready to decode: a row without ``<sop>`` gets the generation blank where it has none ([gMASK]
        in place of a final ``<eos>``: glmkit's continuation layout) and then ``<sop>``; rows are left-padded again.
        Rows that have their ``<sop>`` come back unchanged."""
        keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        rows = [input_ids[b, keep[b]].tolist() for b in range(input_ids.shape[0])]
        if all(self.special.sop in row for row in rows):
            return input_ids, attention_mask
        prompts = GLMPrompts(self.special)
        for i, row in enumerate(rows):
            if self.special.sop in row:
                continue
            if not find_blanks(row, prompts.blank_ids()) and row and row[-1] == self.special.eos:
                row = row[:-1]
            rows[i] = [*prompts.model_input(row), self.special.sop]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.special.pad] * (width - len(r)) + r for r in rows], device=input_ids.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=input_ids.device)
        return ids, mask

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``GenerationMixin.generate`` on GLM rows completed by ``generation_inputs`` first (a ChatGLM family's
        rows as they are), without a KV cache."""
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if self.family == DEFAULT_FAMILY and input_ids is not None:
            if self.special is None:
                raise ValueError("special_tokens: the model config names no special tokens ([CLS], <sop>, ...)")
            input_ids, kwargs["attention_mask"] = self.generation_inputs(input_ids, kwargs.get("attention_mask"))
        kwargs.setdefault("use_cache", False)  # no KV cache: every step recomputes the whole sequence
        return super().generate(input_ids, **kwargs)

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
        if kwargs.get("labels") is not None:  # generate() passes other keywords this class has no use for
            raise ValueError("labels: the generation wrapper computes no loss (glmkit's training loop does)")
        if self.family == "chatglm2":
            return CausalLMOutputWithPast(logits=self.glm(input_ids, position_ids, attention_mask))
        if position_ids is None or attention_mask is None or attention_mask.dim() == 2:
            n_positions = self.glm.config.n_positions if self.family == DEFAULT_FAMILY else None
            position_ids, attention_mask = glm_layout(input_ids, attention_mask, self.special, n_positions)
        if self.family == "chatglm6b":  # the hub class's mask: True = masked
            attention_mask = ~attention_mask
        return CausalLMOutputWithPast(logits=self.glm(input_ids, position_ids, attention_mask))
