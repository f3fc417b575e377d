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

from dataclasses import dataclass, field
from typing import Any, Literal

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
    id: int = -1

    def refs(self) -> list[int]:
        found: list[int] = []
        _collect_refs(self.args, found)
        _collect_refs(self.kwargs, found)
        return found


def _collect_refs(value: Any, found: list[int]) -> None:
    if isinstance(value, Ref):
        found.append(value.id)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_refs(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _collect_refs(item, found)
    elif isinstance(value, slice):
        _collect_refs([value.start, value.stop, value.step], found)


@dataclass
class Invoke:
    """One batch group. `args is None` means the whole batch (an invoke with no input)."""

    args: list[Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


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
        names: set[str] = set()
        _collect_tensor_names([n.args for n in self.nodes], names)
        _collect_tensor_names([n.kwargs for n in self.nodes], names)
        _collect_tensor_names([(i.args, i.kwargs) for i in self.invokes], names)
        return names

    def module_paths(self) -> set[str]:
        from .ops import OPS

        paths = {n.args[0] for n in self.nodes if OPS[n.op].module_event or n.op == "call_module"}
        return {p for p in paths if isinstance(p, str)}


def _collect_tensor_names(value: Any, names: set[str]) -> None:
    if isinstance(value, TensorRef):
        names.add(value.name)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_tensor_names(item, names)
    elif isinstance(value, dict):
        for item in value.values():
            _collect_tensor_names(item, names)
