"""Fast generation for GLM: a prefill + one-token-decode engine with transformers' decoding semantics.

``generate`` / ``stream`` decode one Part-B span per prompt; ``fill_blanks`` fills every blank of a text like the
original GLM ``generate_samples.py``. Decoding knobs are transformers' (``GenerationConfig``).
"""

from .blanks import BlankFill, FillResult, complete, fill_blank_ids, fill_blanks
from .config import GenerationConfig
from .engine import GenerationOutput, generate, stream

__all__ = [
    "BlankFill",
    "FillResult",
    "GenerationConfig",
    "GenerationOutput",
    "complete",
    "fill_blank_ids",
    "fill_blanks",
    "generate",
    "stream",
]
