"""glmkit: the GLM family of language models, from paper to production."""

from .config import GLMConfig, SpecialTokens
from .kv_cache import KVCache
from .model import GLM

__all__ = ["GLM", "GLMConfig", "KVCache", "SpecialTokens"]
__version__ = "0.1.0"
