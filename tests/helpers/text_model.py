"""A tiny GLM saved with a whitespace tokenizer, for the text-level commands (generate, compare-decoding).

The model's vocabulary (64 rows) is padded past the tokenizer's (9 specials + the words), as released GLMs are."""

from __future__ import annotations

from pathlib import Path

import torch

from glmkit import GLM, GLMConfig
from glmkit.tokenizer import WhitespaceTokenizer

WORDS = "the king said unto them go and see what lord hath done in land of egypt for ever".split()


def save_text_model(folder: Path, max_sequence_length: int = 32) -> Path:
    tok = WhitespaceTokenizer(WORDS)
    torch.manual_seed(0)
    config = GLMConfig(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=64,
        max_sequence_length=max_sequence_length,
        special_tokens=tok.special,
    )
    model = GLM(config).eval()
    with torch.no_grad():  # larger word rows: the random model prefers words to special tokens, as a trained one
        model.wte.weight[len(tok.special.to_dict()) - 1 : tok.vocab_size] *= 30
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
