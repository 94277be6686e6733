"""The model glmkit ships: a small GLM pretrained by ``scripts/train_bundled.sh`` (see the README), the default
``--model`` of every command, so glmkit works on a fresh machine with no download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BUNDLED_MODEL = Path(__file__).parent / "assets" / "glmkit-small"


def model_path(path: str | Path | None) -> Path:
    """``path``, or the bundled model when ``None``."""
    if path is not None:
        return Path(path)
    if not (BUNDLED_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the bundled model is missing from {BUNDLED_MODEL}; pass --model PATH")
    return BUNDLED_MODEL


def is_chatglm_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a ChatGLM-family hub checkpoint (config.json says ``model_type: "chatglm"``)."""
    from .config import read_json_object

    config = Path(folder) / "config.json"
    return config.is_file() and read_json_object(config).get("model_type") == "chatglm"


def load_config(path: str | Path | None = None) -> Any:
    """The model config of a checkpoint folder (``None``: the bundled model's): a ``GLMConfig``, or the ChatGLM
    generation's own config for a ChatGLM hub folder."""
    from .config import GLMConfig

    folder = model_path(path)
    if is_chatglm_folder(folder):
        from .chatglm.hub import read_config

        return read_config(folder)
    return GLMConfig.from_file(folder / "config.json")


def load_model_and_tokenizer(path: str | Path | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """A checkpoint folder holding both the model and its tokenizer (as ``glmkit pretrain`` writes them, or a
    ChatGLM hub folder with its ``ice_text.model`` / ``tokenizer.model``)."""
    from .model import GLM
    from .tokenizer import load_tokenizer

    folder = model_path(path)
    model = GLM.from_pretrained(folder, dtype=dtype, device=device)
    if is_chatglm_folder(folder):
        from .chatglm.tokenizers import load_chatglm_tokenizer

        return model, load_chatglm_tokenizer(folder)
    return model, load_tokenizer(folder)
