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
    from .recording import Recording


class Envoy:
    __slots__ = ("_call", "_owner", "_tree")

    def __init__(self, owner: Any, tree: ModuleTree, call: int = 0) -> None:
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "_call", call)

    @property
    def _path(self) -> str:
        return self._tree.path

    def _recording(self, what: str) -> Recording:
        recording: Recording | None = self._owner.open_recording
        if recording is None:
            raise RuntimeError(f"{what} of {self._path or 'the model'} is only available inside model.trace(...)")
        return recording

    # -- values -------------------------------------------------------------------------
    @property
    def output(self) -> Any:
        """The module's output at this call (the current generation step inside tracer.iter)."""
        return self._recording(".output").module_event("output", self._path, self._call)

    @property
    def input(self) -> Any:
        """The module's first positional argument (first keyword argument if it has none)."""
        return self._recording(".input").module_event("input", self._path, self._call)

    @property
    def inputs(self) -> Any:
        """The module's `(args, kwargs)`."""
        return self._recording(".inputs").module_event("inputs", self._path, self._call)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs"):
            self._recording(f".{name}").module_event(f"set_{name}", self._path, self._call, value, with_value=True)
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
        recording = self._owner.open_recording
        if name in tree.params and recording is not None:
            # Inside a trace a parameter is read where the job runs (a thin client has no weights).
            return recording.record("parameter", [f"{tree.path}.{name}" if tree.path else name], {})
        module = self._owner.module_at(tree.path)
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
        recording: Recording | None = self._owner.open_recording
        if recording is not None:
            return recording.record("call_module", [self._path, *args], kwargs)
        module = self._owner.module_at(self._path)
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


def envoy_path(envoy: Envoy) -> str:
    """The module path an envoy stands for ("" for the model itself)."""
    return envoy._path
