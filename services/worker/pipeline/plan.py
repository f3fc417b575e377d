"""Which stage of a pipeline holds which layers of a model.

    plan = StagePlan.balanced(model, 2)         # about equal parameters per stage
    plan = StagePlan.of(model, [(0, 2), (2, 4)])
    plan.owner("transformer.h.3")               # the stage whose run produces that module's event
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from nnfabric.graph.tree import split_source


def find_layers(model: torch.nn.Module) -> str:
    """The path of the model's stack of repeated blocks: its largest ModuleList."""
    best, size = "", -1
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            count = sum(p.numel() for p in module.parameters())
            if count > size:
                best, size = path, count
    if not best:
        raise ValueError("cannot split this model into stages: it has no list of layers")
    return best


@dataclass(frozen=True)
class StagePlan:
    """Which stage holds which layers (`ranges[i]` = [start, stop) of stage i), and which modules
    outside the layers belong to the last stage (those after the layers: final norm, head)."""

    layers: str
    ranges: tuple[tuple[int, int], ...]
    after: frozenset[str] = field(default_factory=frozenset)

    @property
    def count(self) -> int:
        return len(self.ranges)

    @classmethod
    def of(cls, model: torch.nn.Module, ranges: list[tuple[int, int]], layers: str | None = None) -> StagePlan:
        path = layers or find_layers(model)
        total = len(model.get_submodule(path))
        expected = 0
        for start, stop in ranges:
            if start != expected or stop <= start:
                raise ValueError(f"stage layer ranges must be contiguous and non-empty from 0, got {ranges}")
            expected = stop
        if expected != total:
            raise ValueError(f"stage layer ranges cover {expected} layers; the model has {total}")
        return cls(path, tuple((int(a), int(b)) for a, b in ranges), _after_modules(model, path))

    @classmethod
    def balanced(cls, model: torch.nn.Module, count: int, layers: str | None = None) -> StagePlan:
        """`count` stages with about equal parameters each (embeddings count to the first stage,
        the final norm and head to the last)."""
        path = layers or find_layers(model)
        blocks = model.get_submodule(path)
        if not 1 <= count <= len(blocks):
            raise ValueError(f"cannot split {len(blocks)} layers into {count} stages")
        after = _after_modules(model, path)
        inside = {id(p) for p in blocks.parameters()}
        tail = {id(p) for name in after for p in model.get_submodule(name).parameters()}
        head = sum(p.numel() for p in model.parameters() if id(p) not in inside and id(p) not in tail)
        sizes = [sum(p.numel() for p in block.parameters()) for block in blocks]
        total = head + sum(sizes) + sum(p.numel() for p in model.parameters() if id(p) in tail)
        prefix = list(itertools.accumulate(sizes, initial=head))
        cuts, start = [0], 0
        for index in range(1, count):
            target = total * index / count
            latest = len(sizes) - (count - index)  # leave at least one layer to each later stage
            best = min(range(start + 1, latest + 1), key=lambda cut: abs(prefix[cut] - target))
            cuts.append(best)
            start = best
        cuts.append(len(sizes))
        return cls(path, tuple(itertools.pairwise(cuts)), after)

    def stage_of_layer(self, index: int) -> int:
        return next(s for s, (a, b) in enumerate(self.ranges) if a <= index < b)

    def owner(self, path: str, side: str = "in") -> int:
        """The stage whose run produces this module's (or operation's) event."""
        split = split_source(path)
        if split is not None:
            path = split[0]
        last = self.count - 1
        if path == self.layers or self.layers.startswith(f"{path}.") or path == "":
            return 0 if side == "in" else last  # the layers' ancestors: entered first, left last
        if path.startswith(f"{self.layers}."):
            return self.stage_of_layer(int(path[len(self.layers) + 1 :].split(".")[0]))
        top = next((name for name in self.after if path == name or path.startswith(f"{name}.")), None)
        return last if top is not None else 0

    def holds(self, path: str, index: int) -> bool:
        """Whether stage `index` holds the weights of module `path` (so a graph may call it there)."""
        if self.count == 1:
            return True
        if path == "" or path == self.layers or self.layers.startswith(f"{path}."):
            return False
        return self.owner(path) == index

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "ranges": [list(r) for r in self.ranges], "after": sorted(self.after)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StagePlan:
        ranges = tuple((int(a), int(b)) for a, b in data["ranges"])
        return cls(data["layers"], ranges, frozenset(data["after"]))


def _after_modules(model: torch.nn.Module, layers: str) -> frozenset[str]:
    """Modules with weights that come after the layers (registered after them: final norm, head).
    Weightless ones registered after the layers (rotary embeddings) run before them, on stage 0."""
    names = [name for name, _ in model.named_modules()]
    inside_end = max(i for i, name in enumerate(names) if name == layers or name.startswith(f"{layers}."))
    found: set[str] = set()
    for name in names[inside_end + 1 :]:
        module = model.get_submodule(name)
        if layers.startswith(f"{name}.") or any(name.startswith(f"{f}.") for f in found):
            continue
        if any(True for _ in module.parameters()):
            found.add(name)
    return frozenset(found)
