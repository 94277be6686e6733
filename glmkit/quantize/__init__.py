"""Weight-only INT8 / INT4 quantization: offline conversion (``quantize_checkpoint``, ``glmkit quantize``) and the
runtime modules a quantized checkpoint loads into (``GLM.from_pretrained`` swaps them in from its metadata)."""

from .convert import quantize_checkpoint
from .core import quantize_int4, quantize_int8
from .modules import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedTiedHead,
    convert_for_runtime,
    quantize_model,
    scheme_of,
)
from .scheme import QuantScheme

__all__ = [
    "QuantScheme",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedTiedHead",
    "convert_for_runtime",
    "quantize_checkpoint",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "scheme_of",
]
