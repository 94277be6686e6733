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

import torch

from ..kernels.layout import INT4_GROUP_SIZES
from ..kernels.reference import INT4_OFFSET, pack_int4, unpack_int4

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


@dataclass(frozen=True)
class HubQuantization:
    """The weight format of the THUDM hub's quantized checkpoints (``chatglm2-6b-int4``, ``chatglm-6b-int8`` ...;
    ``quantization_bit`` in config.json; THUDM ``quantization.py``, ``QuantizedLinear``).

    Every linear weight of the transformer layers is stored under its own name as signed integers with
    ``weight_scale``, one fp16 scale per output row (``scale = absmax / (2^(bits-1) - 1)``, ``w = q * scale``):
    - 8 bits: ``int8 [N, K]``;
    - 4 bits: ``int8 [N, K / 2]``, two signed nibbles per byte: the high nibble is input ``2j``, the low one ``2j + 1``.
    Embeddings, the output layer, norms and biases stay float.

    It loads losslessly into glmkit's own format (``to_runtime``): int8 as it is; int4 as offset nibbles with the row's
    scale repeated for every group (``runtime_scheme``); the scales in fp32, which holds every fp16 value exactly.
    """

    bits: Literal[8, 4]

    def __post_init__(self) -> None:
        if self.bits not in (8, 4) or isinstance(self.bits, bool):
            raise ValueError(f"quantization_bit: {self.bits!r} is not a hub format; expected 4 or 8 (or 0: float)")

    def weight_shape(self, n: int, k: int) -> tuple[int, int]:
        return (n, k) if self.bits == 8 else (n, k // 2)

    def runtime_scheme(self, widths: list[int]) -> QuantScheme:
        """The glmkit scheme these weights load into: int8 per channel, or int4 with the largest group size that
        divides every input width in ``widths`` (each group then carries its row's scale)."""
        if self.bits == 8:
            return QuantScheme(8)
        group = next((g for g in sorted(GROUP_SIZES, reverse=True) if all(k % g == 0 for k in widths)), None)
        if group is None:
            raise ValueError(
                f"quantization_bit: 4-bit weights of input widths {sorted(set(widths))} do not fit glmkit's int4 "
                f"format, which needs widths divisible by one of {GROUP_SIZES}"
            )
        return QuantScheme(4, group)

    def to_runtime(self, weight: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, ...]:
        """Hub ``weight``/``weight_scale`` → the tensors of a ``QuantizedLinear`` of ``scheme``, exactly."""
        scale = scale.float()
        if self.bits == 8:
            return weight, scale
        b = weight.view(torch.uint8).to(torch.int16)
        high, low = (b >> 4) - ((b >> 7) << 4), (b & 15) - ((b & 8) << 1)  # sign-extended nibbles
        q = torch.stack([high, low], dim=-1).flatten(1)  # [N, K]
        packed = pack_int4((q + INT4_OFFSET).to(torch.uint8))
        return packed, scale[:, None].expand(-1, q.shape[1] // scheme.group_size).contiguous()

    def from_runtime(
        self, weight: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The hub tensors of glmkit ``weight``/``scale`` (checkpoint layout), or None when the hub format cannot
        hold them exactly (scales that vary along a row, or are not fp16 values)."""
        rows = scale.float().reshape(scale.shape[0], -1)
        if scheme.bits != self.bits or not torch.equal(rows, rows[:, :1].expand_as(rows)):
            return None
        row = rows[:, 0]
        if not torch.equal(row.half().float(), row):
            return None
        if self.bits == 8:
            return weight, row.half()
        q = unpack_int4(weight).to(torch.int16) - INT4_OFFSET
        packed = (((q[:, 0::2] << 4) | (q[:, 1::2] & 15)) & 255).to(torch.uint8).view(torch.int8)
        return packed, row.half()
