"""KServe v2 tensors on the wire: JSON ``data`` and Triton's binary tensor extension, both ways.

Rules (the KServe v2 inference protocol, Triton's docs/protocol/extension_binary_data.md, and what ``tritonclient.http``
sends and expects): row-major little-endian data with no padding; BOOL is one byte; a BYTES element is a 4-byte
little-endian length then the raw bytes; binary payloads follow the JSON header in the order their tensors appear in it;
FP16/BF16 cannot travel as JSON. Every problem is a ``TensorError`` naming the tensor, which the HTTP layer turns into a
400.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


class TensorError(ValueError):
    """A tensor that does not match the protocol or the model's metadata."""


def element_count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise TensorError(f"input '{name}': shape must be a list of non-negative ints, got {shape!r}")
    return shape


def serialize_bytes(arr: np.ndarray) -> bytes:
    """BYTES tensor → length-prefixed elements (``tritonclient.utils.serialize_byte_tensor``)."""
    out = bytearray()
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        out += struct.pack("<I", len(b)) + b
    return bytes(out)


def deserialize_bytes(name: str, buf: bytes, count: int) -> np.ndarray:
    items, offset = [], 0
    while offset < len(buf):
        if offset + 4 > len(buf):
            raise TensorError(f"input '{name}': truncated BYTES element length")
        (n,) = struct.unpack_from("<I", buf, offset)
        offset += 4
        if offset + n > len(buf):
            raise TensorError(f"input '{name}': BYTES element of {n} bytes runs past the data")
        items.append(bytes(buf[offset : offset + n]))
        offset += n
    if len(items) != count:
        raise TensorError(f"input '{name}': {len(items)} BYTES elements for a shape of {count} elements")
    return np.array(items, dtype=np.object_)


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for d in data for x in _flatten(d)]
    return [data]


def decode_input(spec: dict[str, Any], raw: bytes | None) -> np.ndarray:
    """One request input from its JSON ``spec`` (and its binary payload, if it has one) as a numpy array."""
    name = spec.get("name")
    datatype = spec.get("datatype")
    if not isinstance(name, str):
        raise TensorError("input: 'name' must be a string")
    if datatype not in NUMPY:
        raise TensorError(f"input '{name}': unsupported datatype {datatype!r}")
    shape = check_shape(name, spec.get("shape"))
    count = element_count(shape)
    if raw is not None:
        if datatype == "BYTES":
            return deserialize_bytes(name, raw, count).reshape(shape)
        dtype = np.dtype(NUMPY[datatype]).newbyteorder("<")
        if len(raw) != count * dtype.itemsize:
            raise TensorError(
                f"input '{name}': {len(raw)} bytes of binary data for {count} {datatype} elements of {dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype).astype(NUMPY[datatype]).reshape(shape)
    if "data" not in spec:
        raise TensorError(f"input '{name}': no 'data' and no binary_data_size")
    if datatype in ("FP16", "BF16"):
        raise TensorError(f"input '{name}': receiving {datatype} data via JSON is not supported, use binary data")
    flat = _flatten(spec["data"])
    if len(flat) != count:
        raise TensorError(f"input '{name}': {len(flat)} elements in 'data' for shape {shape}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise TensorError(f"input '{name}': BYTES data must be JSON strings")
        return np.array([x.encode("utf-8") for x in flat], dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        if not all(isinstance(x, bool) for x in flat):
            raise TensorError(f"input '{name}': BOOL data must be true/false")
    elif not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
        raise TensorError(f"input '{name}': {datatype} data must be numbers")
    try:
        return np.array(flat, dtype=NUMPY[datatype]).reshape(shape)
    except (OverflowError, ValueError) as e:
        raise TensorError(f"input '{name}': {e}") from e


def encode_output(name: str, datatype: str, arr: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """JSON entry of one output and its binary payload (``None`` when sent as JSON ``data``)."""
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
    if binary:
        if datatype == "BYTES":
            raw = serialize_bytes(arr)
        else:
            raw = np.ascontiguousarray(arr, dtype=np.dtype(NUMPY[datatype]).newbyteorder("<")).tobytes()
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    flat = arr.reshape(-1).tolist()
    if datatype == "BYTES":
        flat = [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x) for x in flat]
    entry["data"] = flat
    return entry, None


def split_body(body: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary rest of an infer body (``Inference-Header-Content-Length``)."""
    if header_length is None:
        return body, b""
    if not 0 <= header_length <= len(body):
        raise TensorError(f"Inference-Header-Content-Length: {header_length} is outside the body of {len(body)} bytes")
    return body[:header_length], body[header_length:]
