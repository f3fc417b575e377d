"""Jobs and results to and from wire bytes, with their tensors in a safetensors blob.

Usage::

    data = pack_job(graphs, tensors, session=False, extra={"model": "gpt2"})   # client
    graphs, blob = decode_request(data, limits, module_paths)                   # worker (nnfabric.graph)
    tensors = load_blob(blob)                                                   # never unpickled
    data = pack_saved(saved, session=False)                                     # worker
    per_trace = split_saved(unpack_values(data), traces=1)                      # client

A result's keys are node ids ("12"), or "trace.node" ("1.12") for a session of several traces.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..graph.codec import decode_result, encode_graph, encode_result, encode_session
from ..graph.ir import DType, Graph, MetaTensor, TensorRef
from ..graph.json_form import DTYPE_CODES
from ..graph.leaves import map_leaves
from .torch_ops import dtype_of
from .values import ValueEncoder


def _blob(tensors: dict[str, torch.Tensor]) -> bytes:
    """The tensors as one safetensors blob: a JSON header (padded to 8 bytes) then each tensor's
    bytes in order. Written here because safetensors' own writer costs about 100 us per call,
    which a replica pays for every job of a batch; reading stays with safetensors."""
    if not tensors:
        return b""
    header: dict[str, Any] = {}
    pieces: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        code = DTYPE_CODES.get(str(tensor.dtype).removeprefix("torch."))
        if code is None:  # a dtype safetensors' writer knows and we do not: let it write them all
            return save_tensors({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()})
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        pieces.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *pieces])


def load_blob(blob: bytes) -> dict[str, torch.Tensor]:
    """A validated safetensors blob's tensors (safetensors parses data only: never code)."""
    return load_tensors(blob) if blob else {}


def pack_job(
    graphs: list[Graph], tensors: dict[str, torch.Tensor], session: bool, extra: dict[str, Any] | None = None
) -> bytes:
    """A trace (session=False, one graph) or a session's traces, as one job envelope."""
    if session:
        return encode_session(graphs, _blob(tensors), extra)
    if len(graphs) != 1:
        raise ValueError(f"a job that is not a session has one graph, not {len(graphs)}")
    return encode_graph(graphs[0], _blob(tensors), extra)


def pack_request(graph: Graph, tensors: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> bytes:
    """One trace's job envelope (`pack_job` with session=False)."""
    return pack_job([graph], tensors, False, extra)


def _result_encoder() -> ValueEncoder:
    """Saved values -> result values, with every tensor moved into the blob by a generated name."""
    return ValueEncoder("v", shapes_only_for_meta=True, what="a saved value of type {} cannot be returned")


def _keyed(saved: list[dict[int, Any]], session: bool) -> dict[str, Any]:
    if session:
        return {f"{trace}.{k}": v for trace, values in enumerate(saved) for k, v in values.items()}
    (values,) = saved
    return {str(k): v for k, v in values.items()}


def pack_saved(saved: list[dict[int, Any]], session: bool) -> bytes:
    """Each trace's saved values as one result envelope."""
    encoder = _result_encoder()
    encoded = {k: encoder.encode(v) for k, v in _keyed(saved, session).items()}
    return encode_result(encoded, _blob(encoder.tensors))


def saved_nbytes(saved: list[dict[int, Any]]) -> int:
    """Bytes of the tensors among saved values (what a result will carry)."""
    encoder = _result_encoder()
    encoder.encode([list(part.values()) for part in saved])
    return sum(t.numel() * t.element_size() for t in encoder.tensors.values())


def split_saved(values: dict[str, Any], traces: int) -> list[dict[int, Any]]:
    """A result's values by key -> each trace's saved values by node id."""
    found: list[dict[int, Any]] = [{} for _ in range(traces)]
    for key, value in values.items():
        trace, _, node = key.rpartition(".")
        found[int(trace or 0)][int(node)] = value
    return found


def unpack_values(data: bytes) -> dict[str, Any]:
    """A result's values by their keys: "node", or "trace.node" for a session."""
    values, blob, _ = decode_result(data)
    tensors = load_blob(blob)

    def decode(leaf: Any) -> Any:
        if isinstance(leaf, TensorRef):
            return tensors[leaf.name]
        if isinstance(leaf, DType):
            return dtype_of(leaf.name)
        if isinstance(leaf, MetaTensor):
            return torch.empty(leaf.shape, dtype=dtype_of(leaf.dtype), device="meta")
        return leaf

    return {k: map_leaves(v, decode) for k, v in values.items()}


def unpack_result(data: bytes) -> dict[int, Any]:
    """A single trace's result: saved values by node id."""
    return split_saved(unpack_values(data), 1)[0]
