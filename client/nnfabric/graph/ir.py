"""The intervention graph: plain data that says what to read, edit and keep in a model run.

Usage::

    g = Graph(kind="trace")
    g.invokes.append(Invoke(args=["The Eiffel Tower is in"]))
    out = g.add(Node("output", ["transformer.h.0", 0, 0], invoke=0))
    g.saves.append(out.id)

Arguments are literals (None, bool, int, float, str, slice, Ellipsis, tuple, list, dict with
string keys), `Ref` to an earlier node, `TensorRef` to a tensor carried beside the graph, or
`DType`. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .leaves import iter_leaves, map_leaves

SCHEMA = "nnfabric.graph/1"
RESULT_SCHEMA = "nnfabric.result/1"


@dataclass(frozen=True)
class Ref:
    """A reference to the value of an earlier node."""

    id: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor carried beside the graph, by name."""

    name: str


@dataclass(frozen=True)
class DType:
    """A torch dtype by name, e.g. DType("float16")."""

    name: str


@dataclass(frozen=True)
class MetaTensor:
    """A tensor's dtype and shape without its data: what `model.scan()` returns. Results only."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SourceLine:
    """Where in the user's code a node was recorded, so errors can point there."""

    file: str
    line: int
    code: str = ""

    def describe(self) -> str:
        text = f'File "{self.file}", line {self.line}'
        return f"{text}\n    {self.code}" if self.code else text


@dataclass
class Node:
    op: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    invoke: int = 0
    line: SourceLine | None = None
    # Nodes recorded for generation steps that may never happen (tracer.all()); they are dropped
    # silently when generation ends early.
    optional: bool = False
    # A read that need not wait for the nodes before it (tracer.cache): it runs whenever its
    # module fires, whatever order the model calls modules in.
    unordered: bool = False
    id: int = -1

    def refs(self) -> list[int]:
        found: list[int] = []
        _collect_refs(self.args, found)
        _collect_refs(self.kwargs, found)
        return found


_SCALARS = (str, int, float, bool, type(None))


def _collect_refs(value: Any, found: list[int]) -> None:
    """The node ids `value` refers to, in order (a node's arguments are mostly flat: this is
    the executor's hot path, so scalars are skipped before anything else is asked)."""
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is Ref:
        found.append(value.id)
    elif kind is list or kind is tuple:
        for item in value:
            _collect_refs(item, found)
    elif kind is dict:
        for item in value.values():
            _collect_refs(item, found)
    elif kind is slice:
        _collect_refs((value.start, value.stop, value.step), found)


@dataclass
class Invoke:
    """One batch group. `args is None` means the whole batch (an invoke with no input)."""

    args: list[Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def relabel(value: Any, node: Callable[[int], int], tensor_prefix: str = "") -> Any:
    """`value` with each node reference renumbered by `node` and each tensor name prefixed: how
    graphs are merged (jobs into a batch, edits into a trace) and steps replicated."""

    def leaf(item: Any) -> Any:
        if isinstance(item, Ref):
            return Ref(node(item.id))
        if isinstance(item, TensorRef) and tensor_prefix:
            return TensorRef(tensor_prefix + item.name)
        return item

    return map_leaves(value, leaf)


@dataclass
class Graph:
    kind: Literal["trace", "generate"] = "trace"
    nodes: list[Node] = field(default_factory=list)
    invokes: list[Invoke] = field(default_factory=list)
    saves: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def add(self, node: Node) -> Node:
        node.id = len(self.nodes)
        self.nodes.append(node)
        return node

    def tensor_names(self) -> set[str]:
        values = [(n.args, n.kwargs) for n in self.nodes] + [(i.args, i.kwargs) for i in self.invokes]
        return {leaf.name for leaf in iter_leaves(values) if isinstance(leaf, TensorRef)}

    def module_paths(self) -> set[str]:
        from .ops import OPS

        paths = {n.args[0] for n in self.nodes if OPS[n.op].module_event or n.op == "call_module"}
        return {p for p in paths if isinstance(p, str)}
