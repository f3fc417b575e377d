"""Torch values -> graph values: the one encoder, for what a trace records and for the values a
run saves.

Usage::

    encoder = ValueEncoder("t")
    encoder.encode([tensor, torch.float16, (1, slice(None))])  # [TensorRef("t0"), DType("float16"), (1, slice(...))]
    encoder.tensors                                             # {"t0": tensor}: they travel beside the graph

A tensor is kept once, by identity, under a generated name; dtypes become `DType`, sizes tuples,
mappings (a model's output) dicts with string keys; with `shapes_only_for_meta`, a data-less
tensor (a scan's) becomes its `MetaTensor`. `other` encodes values only its caller knows (a
trace's proxies) or returns NotImplemented.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..graph.ir import DType, MetaTensor, TensorRef


class ValueEncoder:
    def __init__(
        self,
        prefix: str = "v",
        *,
        other: Callable[[Any], Any] | None = None,
        shapes_only_for_meta: bool = False,
        what: str = "a value of type {} cannot be encoded",
    ) -> None:
        self.prefix = prefix
        self.tensors: dict[str, torch.Tensor] = {}
        self._names: dict[int, str] = {}
        self._other = other
        self._meta = shapes_only_for_meta
        self._what = what

    def encode(self, value: Any) -> Any:
        if value is None or value is Ellipsis or isinstance(value, (bool, int, float, str)):
            return value
        if self._other is not None:
            found = self._other(value)
            if found is not NotImplemented:
                return found
        if isinstance(value, torch.Tensor):
            if self._meta and value.device.type == "meta":
                return MetaTensor(str(value.dtype).removeprefix("torch."), tuple(value.shape))
            name = self._names.get(id(value))
            if name is None:
                name = f"{self.prefix}{len(self.tensors)}"
                self.tensors[name] = value
                self._names[id(value)] = name
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
        if isinstance(value, slice):
            return slice(self.encode(value.start), self.encode(value.stop), self.encode(value.step))
        raise TypeError(self._what.format(type(value).__name__))
