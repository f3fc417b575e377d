"""Copying nodes between graphs: one mechanism for merging jobs into a batch (the executor),
applying persistent edits to a trace (the gateway and local runs), and repeating a block of
nodes for each generation step (the tracer).

Usage::

    merged, offsets = merge([graph_a, graph_b])          # node ids of graph i start at offsets[i]
    last = replicate_steps(graph, first=5, start=0, stop=4, optional=True)
    edited = apply_edits(trace_graph, [(edit_graph, "edit0_")])

A copy keeps a node's op, line and flags; its references are renumbered (to the copies made in
the same call, else by `outside`), its tensor names prefixed, its invoke shifted, and a module
event may be moved to another generation step. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .ir import Graph, Invoke, Node, relabel
from .ops import OPS

_LITERALS = frozenset({str, int, float, bool, type(None)})


def _copied(value: Any, ref: Callable[[int], int], prefix: str) -> Any:
    kind = type(value)
    if kind in _LITERALS or (kind is list and all(type(item) in _LITERALS for item in value)):
        return value  # most arguments (names, numbers, token ids) have nothing to renumber
    return relabel(value, ref, prefix)


def copy_nodes(
    target: Graph,
    nodes: Iterable[Node],
    *,
    outside: Callable[[int], int] = lambda node: node,
    invoke_offset: int = 0,
    tensor_prefix: str = "",
    step: int | None = None,
    optional: bool = False,
) -> dict[int, int]:
    """Append a copy of each node to `target`; returns old id -> new id. A reference to a node
    copied in this call points to its copy; any other goes through `outside`. With `step`,
    module events move to that generation step; `optional` marks every copy optional."""
    mapping: dict[int, int] = {}

    def ref(node: int) -> int:
        found = mapping.get(node)
        return outside(node) if found is None else found

    for node in nodes:
        args = [_copied(a, ref, tensor_prefix) for a in node.args]
        if step is not None and OPS[node.op].module_event:
            args[1] = step
        copy = target.add(
            Node(
                op=node.op,
                args=args,
                kwargs={k: _copied(v, ref, tensor_prefix) for k, v in node.kwargs.items()},
                invoke=node.invoke + invoke_offset,
                line=node.line,
                optional=optional or node.optional,
                unordered=node.unordered,
            )
        )
        mapping[node.id] = copy.id
    return mapping


def job_prefix(index: int) -> str:
    """What the tensors of the `index`-th graph of a merge are renamed with."""
    return f"j{index}_"


def merge(graphs: list[Graph]) -> tuple[Graph, list[int]]:
    """Several jobs' graphs as one (the tensors of graph i renamed with `job_prefix(i)`): node
    ids of graph i start at offsets[i], its invokes after those of the graphs before it."""
    merged = Graph(kind=graphs[0].kind if graphs else "trace")
    offsets = []
    for index, graph in enumerate(graphs):
        node_offset, invoke_offset, prefix = len(merged.nodes), len(merged.invokes), job_prefix(index)
        offsets.append(node_offset)

        def shifted(node: int, offset: int = node_offset) -> int:
            return node + offset

        for inv in graph.invokes:
            merged.invokes.append(
                Invoke(
                    args=None if inv.args is None else [_copied(a, shifted, prefix) for a in inv.args],
                    kwargs={k: _copied(v, shifted, prefix) for k, v in inv.kwargs.items()},
                )
            )
        copy_nodes(merged, graph.nodes, outside=shifted, invoke_offset=invoke_offset, tensor_prefix=prefix)
        merged.saves.extend(s + node_offset for s in graph.saves)
    return merged, offsets


def replicate_steps(graph: Graph, first: int, start: int, stop: int, optional: bool) -> dict[int, int]:
    """Repeat the nodes from `first` on (a block recorded for step `start`) once for each later
    step up to `stop`, each copy's module events at its step. A value saved inside the block
    means its value at the last step: the saves are moved there. Returns node id -> its last copy."""
    block = graph.nodes[first:]
    last_copy = {n.id: n.id for n in block}
    for step in range(start + 1, stop):
        last_copy.update(copy_nodes(graph, block, step=step, optional=optional))
    graph.saves = [last_copy.get(s, s) for s in graph.saves]
    return last_copy


def apply_edits(graph: Graph, edits: list[tuple[Graph, str]]) -> Graph:
    """`graph` with each edit (its tensors renamed with the given prefix) applied first: the
    edits' invokes come first (so at every module an edit runs before the trace's own reads),
    their nodes after the trace's (so the trace's node ids and saves stay as they were), and in
    a generation they repeat at every step."""
    if not edits:
        return graph
    steps = range(int(graph.options.get("max_new_tokens", 1))) if graph.kind == "generate" else range(1)
    shift = sum(len(edit.invokes) for edit, _ in edits)
    merged = Graph(kind=graph.kind, saves=list(graph.saves), options=dict(graph.options))
    for edit, _prefix in edits:
        merged.invokes += [Invoke(args=None) for _ in edit.invokes]
    merged.invokes += graph.invokes
    copy_nodes(merged, graph.nodes, invoke_offset=shift)
    first_invoke = 0
    for edit, prefix in edits:
        for step in steps:
            # A module the run never reaches (a step generation skipped) is simply not edited.
            copy_nodes(merged, edit.nodes, invoke_offset=first_invoke, tensor_prefix=prefix, step=step, optional=True)
        first_invoke += len(edit.invokes)
    return merged
