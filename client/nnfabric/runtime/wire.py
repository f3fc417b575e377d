"""Graphs and results to and from wire bytes, with their tensors in a safetensors blob.

Usage::

    data = pack_request(graph, tensors)          # client
    graph, tensors = unpack_request(data)        # worker (validated; never unpickled)
    data = pack_result(saved)                    # worker
    saved = unpack_result(data)                  # client

A session (several traces as one job) travels the same way with pack_session_request /
unpack_requests and pack_session_result / unpack_session_result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..graph.codec import decode_request, decode_result, encode_graph, encode_result, encode_session
from ..graph.ir import DType, Graph, TensorRef
from ..graph.validate import Limits
from .torch_ops import dtype_of


def _blob(tensors: dict[str, torch.Tensor]) -> bytes:
    if not tensors:
        return b""
    # safetensors wants contiguous tensors that share no storage.
    return save_tensors({k: v.detach().contiguous().clone() for k, v in tensors.items()})


def pack_request(graph: Graph, tensors: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> bytes:
    return encode_graph(graph, _blob(tensors), extra)


def pack_session_request(
    graphs: list[Graph], tensors: dict[str, torch.Tensor], extra: dict[str, Any] | None = None
) -> bytes:
    return encode_session(graphs, _blob(tensors), extra)


def unpack_requests(data: bytes, limits: Limits | None = None) -> tuple[list[Graph], dict[str, torch.Tensor]]:
    """A job's traces (one, or a session's several) and their tensors, validated."""
    graphs, blob = decode_request(data, limits)
    return graphs, (load_tensors(blob) if blob else {})


def unpack_request(data: bytes, limits: Limits | None = None) -> tuple[Graph, dict[str, torch.Tensor]]:
    graphs, tensors = unpack_requests(data, limits)
    if len(graphs) != 1:
        raise ValueError(f"expected one graph, got a session of {len(graphs)}")
    return graphs[0], tensors


class _Collector:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"v{len(self.tensors)}"
            self.tensors[name] = value
            return TensorRef(name)
        if isinstance(value, torch.dtype):
            return DType(str(value).removeprefix("torch."))
        if isinstance(value, torch.Size):
            return tuple(value)
        if isinstance(value, tuple):
            return tuple(self.encode(v) for v in value)
        if isinstance(value, list):
            return [self.encode(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): self.encode(v) for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"a saved value of type {type(value).__name__} cannot be returned")


def _pack(values: dict[str, Any]) -> bytes:
    collector = _Collector()
    encoded = {k: collector.encode(v) for k, v in values.items()}
    return encode_result(encoded, _blob(collector.tensors))


def pack_result(saved: dict[int, Any]) -> bytes:
    return _pack({str(k): v for k, v in saved.items()})


def pack_session_result(saved: list[dict[int, Any]]) -> bytes:
    """Each trace's saved values, keyed "trace.node"."""
    return _pack({f"{trace}.{k}": v for trace, values in enumerate(saved) for k, v in values.items()})


def result_nbytes(saved: dict[int, Any] | list[dict[int, Any]]) -> int:
    collector = _Collector()
    parts = saved if isinstance(saved, list) else [saved]
    collector.encode([list(part.values()) for part in parts])
    return sum(t.numel() * t.element_size() for t in collector.tensors.values())


def unpack_session_result(data: bytes, traces: int) -> list[dict[int, Any]]:
    found: list[dict[int, Any]] = [{} for _ in range(traces)]
    for key, value in unpack_values(data).items():
        trace, _, node = key.partition(".")
        found[int(trace)][int(node)] = value
    return found


def unpack_result(data: bytes) -> dict[int, Any]:
    return {int(k): v for k, v in unpack_values(data).items()}


def unpack_values(data: bytes) -> dict[str, Any]:
    """A result's values by their keys: "node", or "trace.node" for a session."""
    values, blob, _ = decode_result(data)
    tensors = load_tensors(blob) if blob else {}

    def decode(value: Any) -> Any:
        if isinstance(value, TensorRef):
            return tensors[value.name]
        if isinstance(value, DType):
            return dtype_of(value.name)
        if isinstance(value, tuple):
            return tuple(decode(v) for v in value)
        if isinstance(value, list):
            return [decode(v) for v in value]
        if isinstance(value, dict):
            return {k: decode(v) for k, v in value.items()}
        return value

    return {k: decode(v) for k, v in values.items()}
