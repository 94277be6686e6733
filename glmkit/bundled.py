"""The model glmkit ships: a small GLM pretrained by ``scripts/train_bundled.sh`` (see the README), the default
``--model`` of every command, so glmkit works on a fresh machine with no download."""

from __future__ import annotations

from pathlib import Path

import torch

BUNDLED_MODEL = Path(__file__).parent / "assets" / "glmkit-small"


def model_path(path: str | Path | None) -> Path:
    """``path``, or the bundled model when ``None``."""
    if path is not None:
        return Path(path)
    if not (BUNDLED_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the bundled model is missing from {BUNDLED_MODEL}; pass --model PATH")
    return BUNDLED_MODEL


def load_model_and_tokenizer(path: str | Path | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """A checkpoint folder holding both the model and its tokenizer (as ``glmkit pretrain`` writes them)."""
    from .model import GLM
    from .tokenizer import load_tokenizer

    folder = model_path(path)
    model = GLM.from_pretrained(folder, dtype=dtype, device=device)
    return model, load_tokenizer(folder)
