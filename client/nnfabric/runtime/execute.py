"""Run a graph on a model: the one entry point shared by local traces and the fabric's workers.

Usage::

    saved = run_graph(graph, tensors, CausalLMAdapter(hf_model, tokenizer))
    saved[node_id]       # each saved node's value
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..errors import InterventionError
from ..graph.ir import Graph, Ref, TensorRef
from .adapters import Batch
from .interleaver import Interleaver


class Adapter(Protocol):
    root: torch.nn.Module

    def batch(self, invokes: list[tuple[list[Any] | None, dict[str, Any]]]) -> Batch: ...
    def forward(self, batch: Batch) -> Any: ...
    def generate(self, batch: Batch, options: dict[str, Any]) -> Any: ...


def _inputs(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, TensorRef):
        return tensors[value.name]
    if isinstance(value, Ref):
        raise InterventionError("invoke inputs cannot refer to graph values")
    if isinstance(value, list):
        return [_inputs(v, tensors) for v in value]
    if isinstance(value, tuple):
        return tuple(_inputs(v, tensors) for v in value)
    if isinstance(value, dict):
        return {k: _inputs(v, tensors) for k, v in value.items()}
    return value


def run_graph(
    graph: Graph, tensors: dict[str, torch.Tensor], adapter: Adapter, deadline: float | None = None
) -> dict[int, Any]:
    """Execute `graph` in one batched forward pass (or one generation); return saved values."""
    invokes = [
        (None if inv.args is None else _inputs(inv.args, tensors), _inputs(inv.kwargs, tensors))
        for inv in graph.invokes
    ]
    try:
        batch = adapter.batch(invokes)
    except (ValueError, TypeError) as exc:
        raise InterventionError(f"bad inputs: {exc}") from exc
    with Interleaver(graph, tensors, adapter.root, batch.rows, batch.size, deadline) as run:
        if graph.kind == "generate":
            run.call(lambda: adapter.generate(batch, graph.options))
        else:
            run.call(lambda: adapter.forward(batch))
    return run.saved()
