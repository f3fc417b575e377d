"""The safetensors blob beside a graph, checked without torch and exactly as strictly as the
loader that will read it (so what the gateway accepts, the worker loads).

Usage::

    specs = check_safetensors(blob, limits)    # {name: (dtype, shape)}; GraphError otherwise

The format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [start, end]}, "__metadata__": {str: str}}, then the data. The loader requires the
tensors' byte ranges, sorted by start, to tile the data exactly: no gap, no overlap, nothing left.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from .bounded_json import parse_json
from .validate import GraphError, LimitExceeded, Limits

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_NAME = 256
_MAX_DIM = 1 << 62


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_safetensors(blob: bytes, limits: Limits) -> dict[str, tuple[str, list[int]]]:
    """Validate a safetensors blob's header and layout; return {name: (dtype, shape)}."""
    if not blob:
        return {}
    if len(blob) > limits.max_tensor_bytes + limits.max_header_bytes:
        raise LimitExceeded(f"tensors of {len(blob)} bytes exceed the limit of {limits.max_tensor_bytes}")
    if len(blob) < 8:
        raise GraphError("tensor blob is truncated")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(limits.max_header_bytes, len(blob) - 8):
        raise GraphError("tensor blob header is truncated or too large")
    raw = blob[8 : 8 + size]
    if not raw.startswith(b"{"):
        raise GraphError("tensor blob header must be a JSON object")
    header = parse_json(raw, limits, "tensor blob header")
    if not isinstance(header, dict):
        raise GraphError("tensor blob header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise GraphError("tensor blob __metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise LimitExceeded(f"{len(header)} tensors exceed the limit of {limits.max_tensors}")
    data_len = len(blob) - 8 - size
    found: dict[str, tuple[str, list[int]]] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, info in header.items():
        dtype, shape, start, end = _entry(name, info, data_len)
        ranges.append((start, end, name))
        found[name] = (dtype, shape)
    position = 0
    for start, end, name in sorted(ranges):
        if start != position:
            raise GraphError(f"tensor {name[:40]!r}: its bytes overlap another's or leave a gap")
        position = end
    if position != data_len:
        raise GraphError("the tensor blob has bytes that belong to no tensor")
    if data_len > limits.max_tensor_bytes:
        raise LimitExceeded(f"tensors of {data_len} bytes exceed the limit of {limits.max_tensor_bytes}")
    return found


def _entry(name: str, info: Any, data_len: int) -> tuple[str, list[int], int, int]:
    """One tensor's (dtype, shape, start, end), checked: a known dtype, a bounded shape, and
    offsets inside the data that hold exactly its bytes."""
    if not name or len(name) > _MAX_NAME:
        raise GraphError(f"tensor names must have 1..{_MAX_NAME} characters")
    dtype = info.get("dtype") if isinstance(info, dict) else None
    shape = info.get("shape") if isinstance(info, dict) else None
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    ok = (
        isinstance(dtype, str)
        and dtype in DTYPE_BYTES
        and isinstance(shape, list)
        and len(shape) <= 64
        and all(_int(d) and 0 <= d < _MAX_DIM for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(_int(o) for o in offsets)
    )
    if not ok:
        raise GraphError(f"tensor {name[:40]!r}: malformed entry in the tensor blob")
    assert isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)
    count, nonzero = 1, 1
    for d in shape:
        count *= d
        nonzero *= max(d, 1)
    if nonzero >= _MAX_DIM:  # the loader's element count would overflow
        raise GraphError(f"tensor {name[:40]!r}: its shape is too large")
    start, end = offsets
    if not 0 <= start <= end <= data_len or end - start != count * DTYPE_BYTES[dtype]:
        raise GraphError(f"tensor {name[:40]!r}: data offsets do not match its shape and dtype")
    return dtype, shape, start, end


def merge_blobs(parts: list[tuple[bytes, str]]) -> bytes:
    """One safetensors blob holding every part's tensors, each part's names given its prefix.
    The parts must have passed `check_safetensors`; a name that would appear twice is refused."""
    header: dict[str, dict[str, object]] = {}
    data: list[bytes] = []
    offset = 0
    for blob, prefix in parts:
        if not blob:
            continue
        (size,) = struct.unpack("<Q", blob[:8])
        entries = json.loads(blob[8 : 8 + size])
        entries.pop("__metadata__", None)
        for name, info in entries.items():
            renamed = prefix + name
            if renamed in header:
                raise GraphError(f"tensor {renamed[:40]!r} is named twice; rename your tensors")
            start, end = info["data_offsets"]
            header[renamed] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [start + offset, end + offset]}
        data.append(blob[8 + size :])
        offset += len(data[-1])
    if not header:
        return b""
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads its header to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(data)
