"""Jobs and results as plain JSON, for HTTP callers in any language (torch-free).

Usage::

    envelope = envelope_from_json(request_body, limits)   # -> the binary envelope, then the one validator
    body = result_to_json(result_envelope)                 # -> {"values": {key: value}}

A job: `{"model", "graph" | "session", "tensors": {name: TENSOR}, "names"}`; a TENSOR is
`{"dtype": "float32", "shape": [2, 3], "data": "<base64 of the little-endian bytes, row-major>"}`.
The JSON form is turned into the very envelope the Python client sends, so both are validated,
limited, queued and run by one code path.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any

from .bounded_json import parse_json
from .codec import decode_result, encode_envelope, split_envelope
from .ir import SCHEMA, DType, MetaTensor, TensorRef
from .leaves import map_leaves
from .tensor_blob import DTYPE_BYTES
from .validate import GraphError, LimitExceeded, Limits

# Torch's dtype names (what callers write) <-> safetensors' codes (what the blob says).
DTYPE_CODES = {
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "int8": "I8",
    "int16": "I16", "int32": "I32", "int64": "I64", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
_FIELDS = {"schema", "model", "graph", "session", "tensors", "names", "edits"}


def envelope_from_json(body: bytes, limits: Limits) -> bytes:
    """A JSON job body -> the binary envelope (still to be validated by `validate_request`)."""
    return _envelope_from_value(parse_json(body, _relaxed(limits), "request body"), limits)


def envelopes_from_batch(body: bytes, limits: Limits, max_jobs: int) -> list[bytes | GraphError]:
    """A JSON batch `{"jobs": [job, ...]}` -> each job's binary envelope, or why it is refused
    (one bad job does not sink the others). The whole body is parsed within one job's bounds."""
    data = parse_json(body, _relaxed(limits), "request body")
    if not isinstance(data, dict) or set(data) != {"jobs"} or not isinstance(data["jobs"], list):
        raise GraphError('a batch is an object {"jobs": [job, ...]}, each job as POST /v1/jobs takes it')
    if not 1 <= len(data["jobs"]) <= max_jobs:
        raise LimitExceeded(f"a batch holds 1 to {max_jobs} jobs, not {len(data['jobs'])}")
    envelopes: list[bytes | GraphError] = []
    for job in data["jobs"]:
        try:
            envelopes.append(_envelope_from_value(job, limits))
        except GraphError as exc:
            envelopes.append(exc)
    return envelopes


def _relaxed(limits: Limits) -> Limits:
    # Base64 tensor data may be longer than any other string a header may hold.
    longest = max(limits.max_string_chars, limits.max_tensor_bytes * 4 // 3 + 8)
    return Limits(**{**limits.__dict__, "max_string_chars": longest})


def _envelope_from_value(data: Any, limits: Limits) -> bytes:
    if not isinstance(data, dict):
        raise GraphError("a JSON job must be an object: {model, graph | session, tensors, names}")
    unknown = set(data) - _FIELDS
    if unknown:
        raise GraphError(f"unknown fields {sorted(unknown)}; a JSON job has {sorted(_FIELDS)}")
    tensors = data.get("tensors") or {}
    if not isinstance(tensors, dict):
        raise GraphError("tensors must be an object: {name: {dtype, shape, data}}")
    header = {k: v for k, v in data.items() if k != "tensors"}
    header.setdefault("schema", SCHEMA)
    return encode_envelope(header, tensors_to_safetensors(tensors, limits))


def tensors_to_safetensors(tensors: dict[str, Any], limits: Limits) -> bytes:
    """{name: {dtype, shape, data (base64)}} -> a safetensors blob, without torch."""
    if not tensors:
        return b""
    if len(tensors) > limits.max_tensors:
        raise LimitExceeded(f"{len(tensors)} tensors exceed the limit of {limits.max_tensors}")
    entries: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        spec = tensors[name]
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data"}:
            raise GraphError(f"tensor {name[:40]!r} must be {{dtype, shape, data}}")
        dtype, shape, text = spec["dtype"], spec["shape"], spec["data"]
        if not isinstance(dtype, str) or dtype not in DTYPE_CODES:
            raise GraphError(f"tensor {name[:40]!r}: dtype must be one of {sorted(DTYPE_CODES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):  # fmt: skip
            raise GraphError(f"tensor {name[:40]!r}: shape must be a list of non-negative integers")
        if not isinstance(text, str):
            raise GraphError(f"tensor {name[:40]!r}: data must be a base64 string")
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise GraphError(f"tensor {name[:40]!r}: data is not valid base64") from None
        count = math.prod(shape)
        code = DTYPE_CODES[dtype]
        if len(raw) != count * DTYPE_BYTES[code]:
            raise GraphError(
                f"tensor {name[:40]!r}: {len(raw)} bytes of data, but shape {shape} of {dtype} needs "
                f"{count * DTYPE_BYTES[code]}"
            )
        entries[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
        if offset > limits.max_tensor_bytes:
            raise LimitExceeded(f"tensors of over {offset} bytes exceed the limit of {limits.max_tensor_bytes}")
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def tensor_to_json(dtype_code: str, shape: list[int], raw: bytes) -> dict[str, Any]:
    return {"dtype": DTYPE_NAMES.get(dtype_code, dtype_code), "shape": shape,
            "data": base64.b64encode(raw).decode()}  # fmt: skip


def result_to_json(data: bytes) -> dict[str, Any]:
    """A result envelope -> {"values": {key: value}}: tensors as {dtype, shape, data (base64)},
    tuples as lists, dtypes as their names, non-finite floats as "NaN", "Infinity", "-Infinity"."""
    values, blob, _ = decode_result(data)
    tensors: dict[str, dict[str, Any]] = {}
    if blob:
        (size,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + size])
        start = 8 + size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            tensors[name] = tensor_to_json(info["dtype"], info["shape"], blob[start + begin : start + end])

    def leaf(item: Any) -> Any:
        if isinstance(item, TensorRef):
            return tensors[item.name]
        if isinstance(item, DType):
            return item.name
        if isinstance(item, MetaTensor):  # a scan's value: shape and dtype, no data
            return {"dtype": item.dtype, "shape": list(item.shape)}
        if isinstance(item, float) and not math.isfinite(item):
            return "NaN" if math.isnan(item) else ("Infinity" if item > 0 else "-Infinity")
        return item

    def plain(value: Any) -> Any:  # tuples -> lists (JSON has only lists)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {"values": {key: plain(map_leaves(value, leaf)) for key, value in values.items()}}


def job_json_from_envelope(data: bytes) -> dict[str, Any]:
    """The JSON form of a binary job envelope (what `envelope_from_json` turns back into it)."""
    header, blob = split_envelope(data, Limits.local())
    body = {k: v for k, v in header.items() if k != "schema"}
    if blob:
        (size,) = struct.unpack("<Q", blob[:8])
        meta = json.loads(blob[8 : 8 + size])
        start = 8 + size
        body["tensors"] = {
            name: tensor_to_json(info["dtype"], info["shape"],
                                 blob[start + info["data_offsets"][0] : start + info["data_offsets"][1]])
            for name, info in meta.items() if name != "__metadata__"
        }  # fmt: skip
    return body
