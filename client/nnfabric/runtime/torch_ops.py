"""The torch side of the op registry: what each allowed name does, and how calls are recorded.

Usage::

    FUNCTIONS["torch.cat"]                   # the callable behind an allowed function name
    SIMPLE["binary"](["add", a, b], {})

Names map to callables through fixed tables built here from the registry's constants; a name
from a request only ever selects an entry of these tables. (Recording calls is tracing's job:
`nnfabric.tracing.recording`.)
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..graph.ops import BINARY_OPERATORS, DTYPES, TENSOR_ATTRIBUTES, TORCH_FUNCTIONS, UNARY_OPERATORS


def _lookup(dotted: str) -> Any:
    target: Any = torch
    for part in dotted.split(".")[1:]:
        target = getattr(target, part)
    return target


FUNCTIONS: dict[str, Any] = {name: _lookup(name) for name in sorted(TORCH_FUNCTIONS)}
# A torch callable -> its allowed name (tracing uses it to record calls that met a proxy).
FUNCTION_NAMES: dict[Any, str] = {fn: name for name, fn in FUNCTIONS.items()}
BINARY: dict[str, Any] = {name: getattr(operator, name) for name in BINARY_OPERATORS}
UNARY: dict[str, Any] = {name: getattr(operator, name) for name in UNARY_OPERATORS}

_DTYPE_TABLE: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}


def dtype_of(name: str) -> torch.dtype:
    if name not in _DTYPE_TABLE:
        raise ValueError(f"unknown dtype {name!r}")
    return _DTYPE_TABLE[name]


def _call_method(args: list[Any], kwargs: dict[str, Any]) -> Any:
    name, target = args[0], args[1]
    if not isinstance(target, torch.Tensor):
        raise TypeError(f".{name}() needs a tensor, got {type(target).__name__}")
    return getattr(target, name)(*args[2:], **kwargs)


def _setitem(args: list[Any], kwargs: dict[str, Any]) -> None:
    args[0][args[1]] = args[2]


def _append(args: list[Any], kwargs: dict[str, Any]) -> None:
    if not isinstance(args[0], list):
        raise TypeError(f".append() needs a list from tracer.list(), got {type(args[0]).__name__}")
    args[0].append(args[1])


# Ops whose result depends only on their (resolved) arguments: (args, kwargs) -> value.
SIMPLE: dict[str, Callable[[list[Any], dict[str, Any]], Any]] = {
    "binary": lambda args, kwargs: BINARY[args[0]](args[1], args[2]),
    "unary": lambda args, kwargs: UNARY[args[0]](args[1]),
    "call_method": _call_method,
    "call_function": lambda args, kwargs: FUNCTIONS[args[0]](*args[1:], **kwargs),
    "getitem": lambda args, kwargs: args[0][args[1]],
    "setitem": _setitem,
    "getattr": lambda args, kwargs: read_attribute(args[0], args[1]),
    "literal": lambda args, kwargs: args[0],
    "list": lambda args, kwargs: [],
    "append": _append,
}


def read_attribute(target: Any, name: str) -> Any:
    """Attribute reads are limited to tensor metadata and keys of mapping-like model outputs."""
    if isinstance(target, torch.Tensor):
        if name not in TENSOR_ATTRIBUTES:
            raise AttributeError(f"tensor attribute {name!r} cannot be read in a graph")
        return getattr(target, name)
    if isinstance(target, Mapping):
        if name not in target:
            raise AttributeError(f"the value has no field {name!r}; it has {sorted(target)}")
        return target[name]
    if type(target).__module__ == "torch.return_types":
        # (values, indices) of topk, max, sort, ...: named fields of a plain tuple.
        fields = [f for f in dir(target) if not f.startswith("_") and f not in ("count", "index", "n_fields",
                  "n_sequence_fields", "n_unnamed_fields")]  # fmt: skip
        if name not in fields:
            raise AttributeError(f"{type(target).__name__} has no field {name!r}; it has {fields}")
        return getattr(target, name)
    raise AttributeError(f"cannot read {name!r} from a value of type {type(target).__name__}")
