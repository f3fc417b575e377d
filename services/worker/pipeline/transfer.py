"""Values as they travel between a pipeline's processes: tensors as numpy byte arrays (Ray hands
them over without pickling), detached and on the CPU; the interleaver's sentinels as marks.

    reply = {"hidden": portable(hidden)}           # leaving a stage
    hidden = arrived(reply["hidden"], device)      # reaching the next one
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from nnfabric.runtime.interleaver import MISSING, SKIPPED


@dataclass(frozen=True)
class Mark:
    """A marker for an interleaver sentinel, which must survive a copy to another process."""

    name: str


POSTPONED: Any = Mark("postponed")  # a value computed on a later stage, where its module lives
DROPPED = Mark("dropped")  # a value nothing later needs: it does not travel
_MARKS = {"missing": MISSING, "skipped": SKIPPED}


@dataclass(frozen=True)
class _Array:
    """A tensor as it travels: its bytes as a numpy array, which Ray hands over without pickling
    them (and a receiver on the same node reads from shared memory), with its dtype and shape."""

    data: Any
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _Array | torch.Tensor:
        if tensor.layout != torch.strided or tensor.is_quantized:
            return tensor
        flat = tensor.contiguous().reshape(-1)
        return cls(flat.view(torch.uint8).numpy(), str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))

    def tensor(self, device: torch.device) -> torch.Tensor:
        # A copy: what arrives may be read-only shared memory, and the graph may write to it.
        raw = torch.from_numpy(self.data.copy()) if self.data.size else torch.empty(0, dtype=torch.uint8)
        found = raw.view(getattr(torch, self.dtype)).reshape(self.shape)
        return found if found.device == device else found.to(device)


def _rebuilt(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """`value` with `leaf` applied to everything but its containers (a model output keeps its type)."""
    if isinstance(value, list):
        return [_rebuilt(v, leaf) for v in value]
    if isinstance(value, tuple):
        return tuple(_rebuilt(v, leaf) for v in value)
    if isinstance(value, dict):
        mapped = {k: _rebuilt(v, leaf) for k, v in value.items()}
        if type(value) is not dict:
            with contextlib.suppress(TypeError):
                return type(value)(**mapped)
        return mapped
    return leaf(value)


def portable(value: Any) -> Any:
    """A value as it travels: tensors detached (an autograd graph never leaves its stage), on the CPU."""

    def leaf(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            found = item.detach()
            return _Array.of(found if found.device.type == "cpu" else found.cpu())
        if item is MISSING:
            return Mark("missing")
        return Mark("skipped") if item is SKIPPED else item

    return _rebuilt(value, leaf)


def arrived(value: Any, device: torch.device) -> Any:
    def leaf(item: Any) -> Any:
        if isinstance(item, _Array):
            return item.tensor(device)
        if isinstance(item, torch.Tensor):
            return item if item.device == device else item.to(device)
        return _MARKS.get(item.name, item) if isinstance(item, Mark) else item

    return _rebuilt(value, leaf)
