"""A model's module tree as data: names, types and children, with or without the real modules.

Usage::

    tree = ModuleTree.from_module(torch_model)       # local
    tree = ModuleTree.from_json(api_structure)       # thin client: no weights
    print(tree.render())
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModuleTree:
    path: str
    type_name: str
    children: dict[str, ModuleTree] = field(default_factory=dict)
    params: dict[str, list[int]] = field(default_factory=dict)  # its own parameters: name -> shape

    @classmethod
    def from_module(cls, module: Any, path: str = "") -> ModuleTree:
        node = cls(path, type(module).__name__)
        for name, param in module.named_parameters(recurse=False):
            node.params[name] = list(param.shape)
        for name, child in module.named_children():
            node.children[name] = cls.from_module(child, f"{path}.{name}" if path else name)
        return node

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str = "") -> ModuleTree:
        node = cls(path, str(data.get("type", "Module")))
        for name, shape in (data.get("params") or {}).items():
            node.params[str(name)] = [int(d) for d in shape]
        for name, child in (data.get("children") or {}).items():
            node.children[str(name)] = cls.from_json(child, f"{path}.{name}" if path else str(name))
        return node

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type_name, "children": {k: v.to_json() for k, v in self.children.items()}}
        if self.params:
            data["params"] = dict(self.params)
        return data

    def paths(self) -> set[str]:
        found = {self.path}
        for child in self.children.values():
            found |= child.paths()
        return found

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
