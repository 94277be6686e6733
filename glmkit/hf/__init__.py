"""glmkit under transformers' Auto classes: ``import glmkit`` registers the config type ``glmkit_glm``
(``glmkit.hf.config``); the first config built registers the models and the tokenizer (``glmkit.hf.auto``).

``AutoTokenizer``, ``AutoModel``, ``AutoModelForCausalLM`` (``generate``), ``AutoModelForSequenceClassification`` and
``AutoModelForMultipleChoice`` then read a glmkit GLM folder (the bundled model, or what ``GLM.save_pretrained``
writes); what they save, glmkit loads. The classes live in ``models.py``, ``heads.py`` and ``tokenizer.py``; the names
below load on first use, so importing this package costs no more than the config.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "GLMHFConfig": "config",
    "GLMHFModel": "models",
    "GLMForHFGeneration": "models",
    "glm_layout": "models",
    "GLMForSequenceClassification": "heads",
    "GLMForMultipleChoice": "heads",
    "ClassificationHead": "heads",
    "GLMTokenizerFast": "tokenizer",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'glmkit.hf' has no attribute {name!r}")
    from importlib import import_module

    from . import auto  # noqa: F401  (every class is registered before it is used)

    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
