"""glmkit: the GLM family of language models, from paper to production."""

from .config import GLMConfig, SpecialTokens
from .hf import config as _hf_config  # noqa: F401  (registers glmkit's model type with transformers' AutoConfig)
from .kv_cache import KVCache
from .model import GLM

__all__ = ["GLM", "GLMConfig", "KVCache", "SpecialTokens"]
__version__ = "0.1.0"
