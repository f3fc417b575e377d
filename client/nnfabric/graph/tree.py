"""A model's module tree as data: names, types and children, with or without the real modules.

Usage::

    tree = ModuleTree.from_module(torch_model)       # local
    tree = ModuleTree.from_json(api_structure)       # thin client: no weights
    print(tree.render())
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SOURCE = "source"  # `<module path>.source.<operation>` addresses an operation inside a forward


def split_source(path: str) -> tuple[str, str] | None:
    """(module path, operation name) for an operation's path, None for a module's."""
    if path.startswith(f"{SOURCE}."):
        return "", path[len(SOURCE) + 1 :]
    module, sep, name = path.rpartition(f".{SOURCE}.")
    return (module, name) if sep else None


@dataclass(frozen=True)
class SourceOp:
    """One call inside a module's forward: its name, its line (1 = the `def` line), that line's text."""

    name: str
    line: int
    text: str


Operations = Callable[[Any], tuple[SourceOp, ...]]


@dataclass
class ModuleTree:
    path: str
    type_name: str
    children: dict[str, ModuleTree] = field(default_factory=dict)
    params: dict[str, list[int]] = field(default_factory=dict)  # its own parameters: name -> shape
    source: tuple[SourceOp, ...] = ()  # the operations inside its forward, for `.source`

    @classmethod
    def from_module(cls, module: Any, path: str = "", operations: Operations | None = None) -> ModuleTree:
        node = cls(path, type(module).__name__)
        for name, param in module.named_parameters(recurse=False):
            node.params[name] = list(param.shape)
        if operations is not None:
            node.source = operations(module)
        for name, child in module.named_children():
            node.children[name] = cls.from_module(child, f"{path}.{name}" if path else name, operations)
        return node

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str = "", sources: dict[str, Any] | None = None) -> ModuleTree:
        if sources is None:
            sources = data.get("sources") or {}
        node = cls(path, str(data.get("type", "Module")))
        for name, shape in (data.get("params") or {}).items():
            node.params[str(name)] = [int(d) for d in shape]
        key = data.get("source")
        if isinstance(key, str) and isinstance(sources.get(key), list):
            node.source = tuple(SourceOp(str(op[0]), int(op[1]), str(op[2])) for op in sources[key])
        for name, child in (data.get("children") or {}).items():
            node.children[str(name)] = cls.from_json(child, f"{path}.{name}" if path else str(name), sources)
        return node

    def to_json(self) -> dict[str, Any]:
        """JSON for the api; modules of one type share one `sources` entry at the root."""
        table: dict[tuple[SourceOp, ...], str] = {}
        data = self._to_json(table)
        if table:
            data["sources"] = {key: [[op.name, op.line, op.text] for op in ops] for ops, key in table.items()}
        return data

    def _to_json(self, table: dict[tuple[SourceOp, ...], str]) -> dict[str, Any]:
        data: dict[str, Any] = {
            "type": self.type_name,
            "children": {k: v._to_json(table) for k, v in self.children.items()},
        }
        if self.params:
            data["params"] = dict(self.params)
        if self.source:
            if self.source not in table:
                table[self.source] = f"{self.type_name}#{len(table)}"
            data["source"] = table[self.source]
        return data

    def paths(self) -> set[str]:
        """Every module path, and every source operation's (`<path>.source.<name>`)."""
        found = {self.path}
        prefix = f"{self.path}.{SOURCE}." if self.path else f"{SOURCE}."
        found |= {prefix + op.name for op in self.source}
        for child in self.children.values():
            found |= child.paths()
        return found

    def source_op(self, name: str) -> ModuleTree:
        """A pseudo-module for one operation inside this module's forward."""
        for op in self.source:
            if op.name == name:
                prefix = f"{self.path}.{SOURCE}." if self.path else f"{SOURCE}."
                return ModuleTree(prefix + name, f"operation: {op.text}")
        here = self.path or "the model"
        if not self.source:
            raise AttributeError(f"{here} ({self.type_name}) has no operations in .source (its forward is not Python)")
        close = difflib.get_close_matches(name, [op.name for op in self.source], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; print({here}.source) lists them"
        raise AttributeError(f"{here}.source has no operation {name!r}{hint}")

    def render_source(self) -> str:
        """The operations as `print(module.source)` shows them: name, line, the source line."""
        label = self.path or "model"
        if not self.source:
            return f"{label} ({self.type_name}): no operations (its forward is not Python source)"
        width = max(len(op.name) for op in self.source)
        lines = [f"{label} ({self.type_name}).forward:"]
        lines += [f"  {op.name:<{width}}  line {op.line:>3}: {op.text}" for op in self.source]
        return "\n".join(lines)

    def walk(self) -> list[ModuleTree]:
        """This module and every module below it, parents first, children in declaration order."""
        found = [self]
        for child in self.children.values():
            found += child.walk()
        return found

    def parameter_paths(self) -> set[str]:
        """Every parameter's dotted name, as `model.get_parameter` takes it."""
        found = {f"{self.path}.{name}" if self.path else name for name in self.params}
        for child in self.children.values():
            found |= child.parameter_paths()
        return found

    def is_sequence(self) -> bool:
        return bool(self.children) and all(k.isdigit() for k in self.children)

    def child(self, name: str) -> ModuleTree:
        if name in self.children:
            return self.children[name]
        here = self.path or "the model"
        close = difflib.get_close_matches(name, list(self.children), n=1)
        hint = f"; did you mean '{self._show(close[0])}'?" if close else ""
        if not self.children:
            hint = f"; {here} ({self.type_name}) has no submodules"
        raise AttributeError(f"{here} has no module {name!r}{hint}")

    def index(self, index: int) -> ModuleTree:
        if not self.is_sequence():
            raise TypeError(f"{self.path or 'the model'} ({self.type_name}) is not a list of modules")
        size = len(self.children)
        if not -size <= index < size:
            raise IndexError(f"{self.path}[{index}] is out of range: {self.path} has {size} modules (0..{size - 1})")
        return self.children[str(index % size)]

    def _show(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def render(self, indent: int = 0) -> str:
        label = self.path.rsplit(".", 1)[-1] if self.path else "model"
        lines = [f"{'  ' * indent}{label}: {self.type_name}"]
        lines += [child.render(indent + 1) for child in self.children.values()]
        return "\n".join(lines)
