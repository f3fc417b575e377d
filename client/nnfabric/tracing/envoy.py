"""Envoy: mirrors a model's module tree so `model.transformer.h[5].mlp.output` reads like the model.

Usage::

    model.transformer.h[-1].mlp        # an Envoy for the last block's MLP
    model.transformer.h[0].attn.next() # the same module's next call in one forward pass
    with model.trace("Hi"):
        out = model.transformer.h[0].mlp.output.save()
        model.transformer.h[1].mlp.output = out * 0
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..graph.tree import ModuleTree

if TYPE_CHECKING:
    from .tracer import Tracer


class Envoy:
    __slots__ = ("_call", "_owner", "_tree")

    def __init__(self, owner: Any, tree: ModuleTree, call: int = 0) -> None:
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "_call", call)

    @property
    def _path(self) -> str:
        return self._tree.path

    def _tracer(self, what: str) -> Tracer:
        tracer: Tracer | None = self._owner._tracer
        if tracer is None:
            raise RuntimeError(f"{what} of {self._path or 'the model'} is only available inside model.trace(...)")
        return tracer

    # -- values -------------------------------------------------------------------------
    @property
    def output(self) -> Any:
        """The module's output at this call (the current generation step inside tracer.iter)."""
        return self._tracer(".output")._module_event("output", self)

    @property
    def input(self) -> Any:
        """The module's first positional argument (first keyword argument if it has none)."""
        return self._tracer(".input")._module_event("input", self)

    @property
    def inputs(self) -> Any:
        """The module's `(args, kwargs)`."""
        return self._tracer(".inputs")._module_event("inputs", self)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs"):
            self._tracer(f".{name}")._module_event(f"set_{name}", self, value, with_value=True)
            return
        raise AttributeError(f"cannot set {name!r} on {self._path or 'the model'}; set .output or .input")

    @property
    def source(self) -> SourceView:
        """The operations inside this module's forward, each with .output/.input like a module:
        `print(model.transformer.h[0].attn.source)` lists them."""
        return SourceView(self._owner, self._tree)

    def next(self, count: int = 1) -> Envoy:
        """The same module's call `count` later within one forward pass (shared or reused modules)."""
        return Envoy(self._owner, self._tree, self._call + count)

    def call(self, index: int) -> Envoy:
        """The module's `index`-th call within one forward pass (0-based)."""
        return Envoy(self._owner, self._tree, index)

    # -- the tree ------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        tree = self._tree
        if name in tree.children:
            return Envoy(self._owner, tree.children[name])
        if name in tree.params and self._owner._tracer is not None:
            # Inside a trace a parameter is read where the job runs (a thin client has no weights).
            return self._owner._tracer._record("parameter", [f"{tree.path}.{name}" if tree.path else name], {})
        module = self._owner._module_at(tree.path)
        if module is not None and hasattr(module, name):
            return getattr(module, name)
        return Envoy(self._owner, tree.child(name))  # raises with the nearest real name

    def __getitem__(self, index: int) -> Envoy:
        return Envoy(self._owner, self._tree.index(index))

    def __len__(self) -> int:
        return len(self._tree.children)

    def __iter__(self) -> Iterator[Envoy]:
        for child in self._tree.children.values():
            yield Envoy(self._owner, child)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tracer: Tracer | None = self._owner._tracer
        if tracer is not None:
            return tracer._record("call_module", [self._path, *args], kwargs)
        module = self._owner._module_at(self._path)
        if module is None:
            raise RuntimeError(f"{self._path} is hosted remotely; call it inside a trace")
        return module(*args, **kwargs)

    def __repr__(self) -> str:
        return self._tree.render()

    def __dir__(self) -> list[str]:
        names = {"output", "input", "inputs", "next", "call", "source"}
        return sorted(set(self._tree.children) | set(self._tree.params) | names)


class SourceView:
    """`module.source`: one Envoy per operation inside the module's forward, by name."""

    __slots__ = ("_owner", "_tree")

    def __init__(self, owner: Any, tree: ModuleTree) -> None:
        self._owner = owner
        self._tree = tree

    def __getattr__(self, name: str) -> Envoy:
        if name.startswith("__"):
            raise AttributeError(name)
        return Envoy(self._owner, self._tree.source_op(name))

    def __iter__(self) -> Iterator[str]:
        return iter(op.name for op in self._tree.source)

    def __repr__(self) -> str:
        return self._tree.render_source()

    def __dir__(self) -> list[str]:
        return [op.name for op in self._tree.source]
