"""Registers glmkit's classes with transformers' Auto classes (``GLMHFConfig`` imports this when first built) and
the renaming between THUDM's hub tensor names (what a GLM folder stores) and glmkit's module names."""

from __future__ import annotations

from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming

from ..checkpoint import HUB_BLOCK_KEYS
from .config import MODEL_TYPE, GLMHFConfig
from .heads import GLMForMultipleChoice, GLMForSequenceClassification
from .models import GLMForHFGeneration, GLMHFModel
from .tokenizer import GLMTokenizerFast

# hub name (under the ``glm.`` prefix) -> glmkit's; transformers applies it on load and reversed on save
RENAMES = [
    ("word_embeddings.weight", "wte.weight"),
    ("transformer.position_embeddings", "wpe"),
    ("transformer.block_position_embeddings", "wbpe"),
    ("transformer.final_layernorm", "ln_f"),
    *((rf"transformer.layers.(\d+).{hub}", rf"blocks.\1.{ours}") for hub, ours in HUB_BLOCK_KEYS.items()),
]
register_checkpoint_conversion_mapping(
    MODEL_TYPE, [WeightRenaming(source_patterns=hub, target_patterns=ours) for hub, ours in RENAMES], overwrite=True
)
AutoModel.register(GLMHFConfig, GLMHFModel, exist_ok=True)
AutoModelForCausalLM.register(GLMHFConfig, GLMForHFGeneration, exist_ok=True)
AutoModelForSequenceClassification.register(GLMHFConfig, GLMForSequenceClassification, exist_ok=True)
AutoModelForMultipleChoice.register(GLMHFConfig, GLMForMultipleChoice, exist_ok=True)
AutoTokenizer.register(GLMHFConfig, GLMTokenizerFast, exist_ok=True)
