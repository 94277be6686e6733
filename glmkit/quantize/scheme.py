"""What a quantized checkpoint holds, recorded in its metadata and never guessed from a file name.

The scheme is written twice, as ``glmkit_quantization`` in ``config.json`` and in the safetensors header; a loader
reads both, refuses a checkpoint where they disagree, and then checks every tensor's shape and dtype against what
the scheme implies (checkpoint.py), so a mislabelled file fails with the key named instead of producing garbage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ..kernels.layout import INT4_GROUP_SIZES

METADATA_KEY = "glmkit_quantization"
FORMAT = "glmkit-weight-only-v1"  # int8 per output row; int4 per group, packed as in glmkit/kernels/reference.py
GROUP_SIZES = INT4_GROUP_SIZES


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only quantization of a GLM.

    Attributes:
        bits: 8 (symmetric, one scale per output channel) or 4 (symmetric, one scale per group of inputs).
        group_size: inputs per int4 scale (32, 64 or 128); ``None`` for int8.
        embeddings: also quantize the word embeddings, and with them the tied LM head (per vocabulary row).
        format: the tensor layout version.
    """

    bits: Literal[8, 4]
    group_size: int | None = None
    embeddings: bool = False
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.bits not in (8, 4) or isinstance(self.bits, bool):
            raise ValueError(f"bits: {self.bits!r} is not supported; choose 8 (per-channel) or 4 (per-group)")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size: {self.group_size!r} is not supported for int4; choose one of {GROUP_SIZES}")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError(f"group_size: int8 uses one scale per output channel, got group_size={self.group_size}")
        if not isinstance(self.embeddings, bool):
            raise ValueError(f"embeddings: expected a bool, got {self.embeddings!r}")
        if self.format != FORMAT:
            raise ValueError(f"format: {self.format!r} is not a layout this glmkit reads (expected {FORMAT!r})")

    def describe(self) -> str:
        return "int8 per channel" if self.bits == 8 else f"int4, group size {self.group_size}"

    def check_width(self, name: str, in_features: int) -> None:
        """Raise if this scheme cannot quantize a matrix with ``in_features`` inputs (the module ``name``)."""
        if self.bits == 4 and in_features % self.group_size:
            raise ValueError(
                f"group_size: {self.group_size} does not divide the input width {in_features} of {name}; "
                f"choose a group size that divides it (of {GROUP_SIZES})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str) -> QuantScheme:
        """Parse the recorded scheme; ``source`` names where it came from for the error message."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: {METADATA_KEY} must be a mapping, got {d!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown or "bits" not in d:
            raise ValueError(f"{source}: {METADATA_KEY} has unknown or missing field(s) {unknown or ['bits']}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {METADATA_KEY}: {e}") from e


def read_scheme(
    config: dict[str, Any],
    config_path: Path,
    header: dict[str, str] | None = None,
    weights_path: Path | None = None,
) -> QuantScheme | None:
    """The scheme recorded in a parsed ``config.json`` (``None``: not quantized). With the safetensors ``header``
    of ``weights_path``, that header must record the same scheme."""
    in_config = config.get(METADATA_KEY)
    scheme = None if in_config is None else QuantScheme.from_dict(in_config, str(config_path))
    if header is None:
        return scheme
    raw = header.get(METADATA_KEY)
    try:
        in_header = None if raw is None else QuantScheme.from_dict(json.loads(raw), f"{weights_path} metadata")
    except json.JSONDecodeError as e:
        raise ValueError(f"{weights_path}: metadata {METADATA_KEY} is not JSON ({e})") from e
    if in_header != scheme:
        raise ValueError(
            f"{weights_path}: its metadata {METADATA_KEY}={raw} disagrees with {config_path} "
            f"{METADATA_KEY}={json.dumps(in_config)}; refusing to guess which one describes the tensors"
        )
    return scheme
