"""``GLMTokenizerFast``: the transformers tokenizer of glmkit's byte-level BPE folders, registered with
``AutoTokenizer`` (a folder's ``tokenizer_config.json`` names it; without glmkit imported, transformers falls back to
its plain ``TokenizersBackend`` over the same ``tokenizer.json``).

What it adds to the plain backend is GLM's input layout: ``tokenizer(text)`` gives ``[CLS] text <eos>`` and a pair
``[CLS] a b <eos>`` (THUDM/GLM ``tasks/data_utils.py`` ``build_input_from_ids`` without ``add_sep``; the hub
``GLMTokenizerMixin.build_inputs_with_special_tokens``), the ``[CLS]`` the classification heads pool; its
``model_max_length`` is the model's ``max_sequence_length`` (from the folder's ``config.json`` when the tokenizer
config does not say), so ``truncation=True`` cuts at the context, from the left as the hub tokenizer does (a
prompt's blank sits at its end). Padding goes left, which ``generate`` expects; the models accept either side.
glmkit's own ``GLMTokenizer`` reads the same files and ignores the template (it encodes without special tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import processors
from transformers import TokenizersBackend
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from ..tokenizer import EOP, SOP


class GLMTokenizerFast(TokenizersBackend):
    """A GLM BPE tokenizer whose template is ``[CLS] text <eos>``; ``sop_token_id`` / ``eop_token_id`` /
    ``gmask_token_id`` / ``smask_token_id`` name the blank-infilling tokens, as the hub ``GLMTokenizerMixin`` does."""

    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    truncation_side = "left"

    def update_post_processor(self) -> None:
        if self.cls_token is None or self.eos_token is None:
            return super().update_post_processor()
        cls, eos = self.cls_token, self.eos_token
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {eos}",
            pair=f"{cls} $A $B:1 {eos}:1",
            special_tokens=[(cls, self.cls_token_id), (eos, self.eos_token_id)],
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any) -> GLMTokenizerFast:
        """``TokenizersBackend.from_pretrained``; ``model_max_length`` defaults to the ``max_sequence_length`` of
        the model config in the same (local) folder."""
        tokenizer = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        config = Path(pretrained_model_name_or_path) / "config.json"
        if tokenizer.model_max_length >= VERY_LARGE_INTEGER and config.is_file():
            length = json.loads(config.read_text(encoding="utf-8")).get("max_sequence_length")
            if isinstance(length, int) and length > 0:
                tokenizer.model_max_length = length
        return tokenizer

    @property
    def sop_token_id(self) -> int | None:
        return self._token_id(SOP)

    @property
    def eop_token_id(self) -> int | None:
        return self._token_id(EOP)

    @property
    def gmask_token_id(self) -> int | None:
        return self._token_id("[gMASK]")

    @property
    def smask_token_id(self) -> int | None:
        return self._token_id("[sMASK]")

    def _token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)
