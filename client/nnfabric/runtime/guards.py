"""Limits a job meets while it runs on a shared replica, checked before the cost is paid.

Usage::

    budget = Budget(deadline=time.monotonic() + 120)
    budget.check_time()                          # between every node and in every hook
    budget.check_op("call_function", args, kw)   # before an op that could create something huge
    budget.check_value(result)                   # after it: Python lists and strings stay bounded

Local traces run without a budget (your machine, your limits). `NeedsSolo` is how a job in a
merged forward pass says it wants something only a run of its own may do (writing a value
shared by every row, touching an object that is not per row): the executor then runs it alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InterventionError
from ..graph.leaves import iter_leaves, map_leaves
from .torch_ops import FUNCTIONS


class NeedsSolo(Exception):
    """A job in a merged forward pass needs a run of its own (it is not an error of the job)."""


# Ops whose output size is not bounded by their inputs' sizes: checked by running them on the
# "meta" device first (shapes only, no data, microseconds).
_GROWING_FUNCTIONS = frozenset({
    "torch.arange", "torch.cat", "torch.einsum", "torch.eye", "torch.full", "torch.full_like",
    "torch.linspace", "torch.matmul", "torch.ones", "torch.ones_like", "torch.outer",
    "torch.rand_like", "torch.randn_like", "torch.stack", "torch.tensor", "torch.where",
    "torch.zeros", "torch.zeros_like", "torch.nn.functional.one_hot",
})  # fmt: skip
_CREATING = frozenset({"torch.arange", "torch.eye", "torch.full", "torch.linspace", "torch.ones", "torch.zeros",
                       "torch.tensor"})  # fmt: skip
_GROWING_METHODS = frozenset({"expand", "expand_as", "matmul", "repeat", "where"})


@dataclass(frozen=True)
class Budget:
    deadline: float | None = None
    max_elements: int = 1 << 27  # elements of one tensor an op may create (512 MiB of float32)
    max_items: int = 1 << 20  # items of a Python list or characters of a string
    max_int_bits: int = 1 << 16  # bits of a Python integer

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise InterventionError("the job ran past its time limit and was stopped")

    def check_op(self, op: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        if op == "binary":
            self._check_binary(args[0], args[1], args[2])
        elif op == "call_function" and args[0] in _GROWING_FUNCTIONS:
            self._check_meta(FUNCTIONS[args[0]], args[1:], kwargs, creating=args[0] in _CREATING)
        elif op == "call_method" and isinstance(args[1], torch.Tensor):
            name, target = args[0], args[1]
            if name == "tolist" and target.numel() > self.max_items:
                raise self._too_big(f".tolist() of {target.numel()} elements")
            if name in _GROWING_METHODS:
                self._check_meta(getattr(torch.Tensor, name), args[1:], kwargs, creating=False)

    def check_value(self, value: Any) -> None:
        if isinstance(value, (str, list, tuple)) and len(value) > self.max_items:
            raise self._too_big(f"a {type(value).__name__} of {len(value)} items")

    def _too_big(self, what: str) -> InterventionError:
        return InterventionError(f"{what} is over this fabric's limit for one value")

    def _check_binary(self, name: str, left: Any, right: Any) -> None:
        ints = [v for v in (left, right) if isinstance(v, int) and not isinstance(v, bool)]
        if len(ints) == 2:
            if name == "pow" and right > 0 and abs(left) > 1 and abs(left).bit_length() * right > self.max_int_bits:
                raise self._too_big(f"{left} ** {right}")
            if name == "mul" and abs(left).bit_length() + abs(right).bit_length() > self.max_int_bits:
                raise self._too_big("the product")
            return
        sequences = [v for v in (left, right) if isinstance(v, (str, list, tuple))]
        if sequences and name == "mul" and ints and len(sequences[0]) * max(ints[0], 0) > self.max_items:
            raise self._too_big(f"a {type(sequences[0]).__name__} repeated {ints[0]} times")
        if len(sequences) == 2 and name == "add" and len(left) + len(right) > self.max_items:
            raise self._too_big("the concatenation")
        tensors = [v for v in (left, right) if isinstance(v, torch.Tensor)]
        if len(tensors) == 2:
            if name == "matmul":
                self._check_meta(torch.matmul, [left, right], {}, creating=False)
                return
            try:
                shape = torch.broadcast_shapes(left.shape, right.shape)
            except RuntimeError:
                return  # the real op says what is wrong
            if shape.numel() > self.max_elements:
                raise self._too_big(f"a result of shape {tuple(shape)}")

    def _check_meta(self, fn: Any, args: list[Any], kwargs: dict[str, Any], creating: bool) -> None:
        margs, mkwargs = map_leaves(
            (list(args), dict(kwargs)), lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v
        )
        if creating:
            mkwargs["device"] = "meta"
        try:
            out = fn(*margs, **mkwargs)
        except Exception:
            return  # invalid or not runnable on meta: the real op says what is wrong
        for leaf in iter_leaves(out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(leaf, torch.Tensor) and leaf.numel() > self.max_elements:
                raise self._too_big(f"a result of shape {tuple(leaf.shape)}")
