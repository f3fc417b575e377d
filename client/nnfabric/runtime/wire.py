"""Graphs and results to and from wire bytes, with their tensors in a safetensors blob.

Usage::

    data = pack_request(graph, tensors)          # client
    graph, tensors = unpack_request(data)        # worker (validated; never unpickled)
    data = pack_result(saved)                    # worker
    saved = unpack_result(data)                  # client
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..graph.codec import decode_graph, decode_result, encode_graph, encode_result
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


def unpack_request(data: bytes, limits: Limits | None = None) -> tuple[Graph, dict[str, torch.Tensor]]:
    graph, blob = decode_graph(data, limits)
    return graph, (load_tensors(blob) if blob else {})


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


def pack_result(saved: dict[int, Any], extra: dict[str, Any] | None = None) -> bytes:
    collector = _Collector()
    values = {str(k): collector.encode(v) for k, v in saved.items()}
    return encode_result(values, _blob(collector.tensors), extra)


def result_nbytes(saved: dict[int, Any]) -> int:
    collector = _Collector()
    collector.encode(list(saved.values()))
    return sum(t.numel() * t.element_size() for t in collector.tensors.values())


def unpack_result(data: bytes) -> dict[int, Any]:
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

    return {int(k): decode(v) for k, v in values.items()}
