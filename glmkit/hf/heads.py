"""GLM's classification head on the pooled ``[CLS]`` hidden state, for sequence classification and multiple choice.

The head is the reference's (THUDM/GLM ``model/downstream.py`` ``PoolingModel`` with ``--pool-token cls``; paper
section 2.3's classification baseline): ``out_proj(dropout(tanh(dense(h_[CLS]))))``, ``dense`` H→H, ``out_proj``
H→labels. Multiple choice is the same head with one score per row: each choice is a row ``[CLS] context choice
<eos>``, the scores of one example's choices are its logits, softmaxed by the cross-entropy over choices. The hub
``GLMForMultipleChoice`` scores choices by their tokens' log-probabilities instead (cloze); glmkit's cloze scoring is
``glmkit.cloze``. Both models take ``input_ids``, ``attention_mask`` and ``labels`` and return ``loss`` + ``logits``,
so they train in transformers' ``Trainer`` or in a plain loop over a glmkit ``GLM`` (``from_glm``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import initialization as init
from transformers.modeling_outputs import MultipleChoiceModelOutput, SequenceClassifierOutput

from ..config import read_json_object
from ..prompts import DEFAULT_FAMILY
from .config import GLMHFConfig
from .models import GLMHFPreTrainedModel, first_tokens


class ClassificationHead(torch.nn.Module):
    """``out_proj(dropout(tanh(dense(pooled))))``: pooled ``[.., H]`` → ``[.., n_out]``."""

    def __init__(self, n_embd: int, n_out: int, dropout: float) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(n_embd, n_embd)
        self.dropout = torch.nn.Dropout(dropout)
        self.out_proj = torch.nn.Linear(n_embd, n_out)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(pooled))))


class _PooledHead(GLMHFPreTrainedModel):
    """A GLM with a ``ClassificationHead`` on each row's first token, ``n_out`` scores per row."""

    def build_head(self, config: GLMHFConfig) -> None:
        if self.family != DEFAULT_FAMILY:
            raise ValueError(f"glmkit_family: the classification heads take a GLM, not a {self.family} model")
        dropout = config.classifier_dropout
        if dropout is None:
            dropout = self.glm.config.output_dropout
        self.classifier = ClassificationHead(self.glm.config.n_embd, self.n_out(config), dropout)

    def n_out(self, config: GLMHFConfig) -> int:
        raise NotImplementedError

    def _init_weights(self, module: torch.nn.Module) -> None:
        """A new head starts at N(0, initializer_range) with zero biases (transformers' convention)."""
        head = getattr(self, "classifier", None)
        if head is not None and (module is head.dense or module is head.out_proj):
            init.normal_(module.weight, mean=0.0, std=self.glm.config.initializer_range)
            init.zeros_(module.bias)

    def pooled_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.classifier(hidden[rows, first_tokens(attention_mask, input_ids.shape).to(hidden.device)])


class GLMForSequenceClassification(_PooledHead):
    """``AutoModelForSequenceClassification``: ``num_labels`` logits per row; with ``labels``, cross-entropy
    (``num_labels == 1``: mean squared error, a regression; float ``[B, num_labels]`` labels: multi-label BCE)."""

    def n_out(self, config: GLMHFConfig) -> int:
        return config.num_labels

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained``; asking a folder that holds a trained head for another number of
        labels raises ``ValueError`` naming both (``ignore_mismatched_sizes=True`` starts a new head instead)."""
        saved = Path(pretrained_model_name_or_path) / "config.json"
        config = kwargs.get("config")
        want = config.num_labels if isinstance(config, GLMHFConfig) else kwargs.get("num_labels")
        if want is not None and saved.is_file() and not kwargs.get("ignore_mismatched_sizes"):
            d = read_json_object(saved)
            have = len(d.get("id2label") or {})
            if cls.__name__ in (d.get("architectures") or []) and have and have != want:
                raise ValueError(
                    f"num_labels={want}, but {saved.parent} holds a classification head trained for {have} labels "
                    f"({list(d['id2label'].values())}); pass ignore_mismatched_sizes=True to start a new head"
                )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutput:
        logits = self.pooled_scores(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = self.loss(logits, labels.to(logits.device))
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = self.config.num_labels
        if n == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(-1))
        if labels.is_floating_point():
            if labels.shape != logits.shape:
                raise ValueError(f"labels: float (multi-label) labels need shape {tuple(logits.shape)}")
            return F.binary_cross_entropy_with_logits(logits, labels)
        if labels.numel() != logits.shape[0] or int(labels.min()) < 0 or int(labels.max()) >= n:
            raise ValueError(f"labels: expected one class id in [0, {n}) per row, got {labels.tolist()}")
        return F.cross_entropy(logits, labels.reshape(-1))


class GLMForMultipleChoice(_PooledHead):
    """``AutoModelForMultipleChoice``: ``input_ids [B, C, S]`` (each choice a row), logits ``[B, C]`` (one score per
    choice); with ``labels [B]`` (the right choice), cross-entropy over the choices."""

    def n_out(self, config: GLMHFConfig) -> int:
        return 1

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> MultipleChoiceModelOutput:
        if input_ids.dim() != 3:
            raise ValueError(f"input_ids: expected shape [batch, choices, length], got {tuple(input_ids.shape)}")
        B, C, S = input_ids.shape
        flat_mask = attention_mask.reshape(B * C, S) if attention_mask is not None else None
        logits = self.pooled_scores(input_ids.reshape(B * C, S), flat_mask).view(B, C)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device).reshape(-1)
            if labels.numel() != B or int(labels.min()) < 0 or int(labels.max()) >= C:
                raise ValueError(f"labels: expected one choice index in [0, {C}) per example, got {labels.tolist()}")
            loss = F.cross_entropy(logits, labels)
        return MultipleChoiceModelOutput(loss=loss, logits=logits)
