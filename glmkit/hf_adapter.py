"""The transformers wrapper's first home: its names now live in ``glmkit.hf`` (``models.py``), re-exported here."""

from .hf import auto  # noqa: F401  (registers the Auto classes)
from .hf.config import GLMHFConfig
from .hf.models import MODELS, GLMForHFGeneration, glm_layout

__all__ = ["MODELS", "GLMForHFGeneration", "GLMHFConfig", "glm_layout"]
