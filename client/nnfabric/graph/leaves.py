"""One walker for the value grammar of graphs: nested lists, tuples, dicts (string keys) and slices.

Usage::

    refs = [leaf.id for leaf in iter_leaves(node.args) if isinstance(leaf, Ref)]
    shifted = map_leaves(node.args, lambda leaf: Ref(leaf.id + 10) if isinstance(leaf, Ref) else leaf)

Every place that walks graph values (validation, remapping, resolving references, feeding
inputs) goes through these two, so they agree on what a container is (a slice's bounds are
values too). Torch-free: the runtime passes functions that turn leaves into tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


def map_leaves(value: Any, fn: Callable[[Any], Any]) -> Any:
    """Rebuild `value` with `fn` applied to every leaf (anything but list, tuple, dict and slice)."""
    if isinstance(value, list):
        return [map_leaves(v, fn) for v in value]
    if type(value) is tuple:
        return tuple(map_leaves(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_leaves(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(map_leaves(value.start, fn), map_leaves(value.stop, fn), map_leaves(value.step, fn))
    return fn(value)


def iter_leaves(value: Any) -> Iterator[Any]:
    """Every leaf of `value`, depth first, in order."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list) or type(item) is tuple:
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, slice):
            stack.extend((item.step, item.stop, item.start))
        else:
            yield item
