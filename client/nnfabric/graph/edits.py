"""Persistent edits: a recorded graph of writes that every later trace of a model applies first.

Usage::

    check_edit(edit_graph)                                   # GraphError unless it only edits
    merged = apply_edits(trace_graph, [(edit_graph, "edit0_")])   # nnfabric.graph.merging

An edit is an ordinary graph whose invokes have no inputs (it acts on the whole batch of the
trace it joins, which for a job on the fabric is that job's own rows only) and which keeps no
values. Applying it puts its invokes before the trace's, so at every module the edit runs before
the trace's own reads see the value: the trace observes the edited model. Its nodes go after the
trace's nodes, so the trace's node ids (and its saved values) stay as they were. In a generation
the edit repeats at every step. Nothing here imports torch; the gateway merges stored edits into
jobs with it.
"""

from __future__ import annotations

from .ir import Graph, Node
from .ops import OPS
from .validate import GraphError

# What an edit may not do: keep values, take gradients, end the run, or reach outside itself.
_NOT_IN_EDITS = frozenset({"backward", "grad", "set_grad", "stop", "from_trace", "model_output"})
MAX_EDITS_PER_JOB = 16


def check_edit(graph: Graph) -> None:
    """Raise GraphError unless `graph` is a valid edit: a trace, no inputs, no saves, step 0 only."""
    if graph.kind != "trace":
        raise GraphError("an edit is recorded with model.edit(), not in a generation")
    if graph.saves:
        raise GraphError("an edit keeps no values: .save() belongs in the traces that use the edited model")
    if any(invoke.args is not None for invoke in graph.invokes):
        raise GraphError("an edit takes no inputs: it applies to whatever each later trace runs")
    if graph.options:
        raise GraphError(f"an edit takes no options, got {sorted(graph.options)}")
    for node in graph.nodes:
        if node.op in _NOT_IN_EDITS:
            raise GraphError(f"node {node.id}: {node.op!r} cannot be part of an edit", node.id)
        if OPS[node.op].module_event and node.args[1] != 0:
            raise GraphError(f"node {node.id}: an edit applies at every step; it cannot address step {node.args[1]}")
    if not any(_writes(node) for node in graph.nodes):
        raise GraphError("this edit changes nothing: assign to a module's .output/.input inside model.edit()")


def _writes(node: Node) -> bool:
    if node.op in ("setitem", "set_output", "set_input", "set_inputs"):
        return True
    return node.op == "call_method" and isinstance(node.args[0], str) and node.args[0].endswith("_")
