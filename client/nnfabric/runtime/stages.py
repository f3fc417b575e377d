"""One language model split into pipeline stages, each holding a contiguous range of its layers.

Usage::

    plan = StagePlan.balanced(shell, 2)                  # or StagePlan.of(shell, [(0, 2), (2, 4)])
    stage = Stage(load_stage(directory, plan, 1), plan, 1)   # loads only stage 1's weights
    pipeline = Pipeline(shell, tokenizer, plan, links)   # links: each stage, in-process or a Ray actor
    saved = run_graph(graph, tensors, pipeline)          # exactly as on one device

How a graph runs over stages. Every stage runs the model's own forward, with the layers of other
stages replaced by stubs that pass their input through (and, after the first stage, the input
embeddings by stubs of the right shape). The first stage stops at the first layer it does not
hold and hands on that layer's input; a later stage replaces its first layer's input by the
hidden state it receives. Each stage hooks only the modules it holds; the graph's values and
progress (the interleaver's state) travel with the hidden state, so a value read on stage 0 can
be written into stage 1. A call into a module that lives on a later stage (`model.lm_head(h)` for
a logit lens of an early layer) waits, with everything computed from it, until the run reaches
that stage. Gradients flow back stage by stage: each stage is given the gradient of its output
and hands the gradient of its input to the stage before it. A value the graph carries from an
earlier stage into a later one is a constant there: gradients reach earlier stages through the
hidden state.

The replica that owns the stages keeps a "shell": the whole model's module tree on the meta
device (no memory), for the module tree thin clients see, tokenizing, and Hugging Face's own
`generate` loop, whose forward calls run through the stages; each stage keeps its own key/value
cache for the layers it holds.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import InterventionError
from ..graph.ir import Graph, Node, SourceLine
from ..graph.tree import split_source
from .adapters import Batch, CausalLMAdapter
from .decoding import Decoding
from .guards import Budget, NeedsSolo
from .interleaver import _MISSING, _SKIPPED, EarlyStop, Interleaver, ModuleEvent


class StageLost(Exception):
    """A stage's process is gone: the run cannot go on, and the replica must be replaced whole."""


# -- the plan ------------------------------------------------------------------------------------


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


# -- one stage's model ------------------------------------------------------------------------------


class _LayerStub(torch.nn.Module):
    """A layer another stage holds: its input passes through (it is replaced or never used)."""

    def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        return hidden_states


class _EmbeddingStub(torch.nn.Module):
    """An embedding of the first stage, on a later stage: zeros of the right shape (the first
    layer's input is replaced by the hidden state the stage receives)."""

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.width = width
        self.dtype = dtype

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.width, dtype=self.dtype, device=ids.device)


class _PassStub(torch.nn.Module):
    def forward(self, value: Any, *args: Any, **kwargs: Any) -> Any:
        return value


def shell_model(source: str, dtype: torch.dtype = torch.float32) -> Any:
    """The whole model's modules with no weights in memory (meta device): its tree and config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(source)
    model.train(False)
    return model


def load_stage(source: str, plan: StagePlan, index: int, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Any:  # fmt: skip
    """Stage `index` of the model in directory `source`: only its weights are read from the
    safetensors checkpoint; every other module is a stub or stays on the meta device."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    model = shell_model(source, dtype)
    aliases: dict[int, list[str]] = {}  # tied weights (a head that is the embedding) share one checkpoint key
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    alias_of = {name: names for names in aliases.values() for name in names}
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict) and getattr(model.config, "tie_word_embeddings", False):
        for target, origin in tied.items():
            alias_of[target] = [*alias_of.get(target, []), origin]
    blocks = model.get_submodule(plan.layers)
    start, stop = plan.ranges[index]
    for layer in range(len(blocks)):
        if not start <= layer < stop:
            blocks[layer] = _LayerStub()
    if index > 0:
        replaced: list[str] = []
        for name, module in list(model.named_modules()):
            if not name or plan.owner(name) != 0 or name == plan.layers or plan.layers.startswith(f"{name}."):
                continue
            if any(name.startswith(f"{done}.") for done in replaced) or next(module.parameters(recurse=False), None) is None:
                continue
            embedding = isinstance(module, torch.nn.Embedding)
            _replace(model, name, _EmbeddingStub(module.embedding_dim, dtype) if embedding else _PassStub())
            replaced.append(name)
    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"a staged model needs a safetensors checkpoint in {source}")
    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    wanted = [
        name
        for name, _ in itertools.chain(
            model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
        )
        if plan.holds(name.rsplit(".", 1)[0], index)
    ]
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in wanted:
        key = name if name in where else next((a for a in alias_of.get(name, []) if a in where), None)
        if key is None:
            if name in params:
                raise KeyError(f"the checkpoint in {source} has no weight for {name}")
            continue  # a buffer the model computes itself
        with safe_open(str(where[key]), framework="pt", device="cpu") as handle:
            value = handle.get_tensor(key)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype if value.is_floating_point() else None)
    for param in model.parameters():
        if param.device.type != "meta":
            param.requires_grad_(True)  # as the one-stage loader: gradients reach every weight's input
    return model


def _replace(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


# -- the interleaver's state, travelling between stages ---------------------------------------------


@dataclass(frozen=True)
class _Mark:
    """A marker for an interleaver sentinel, which must survive a copy to another process."""

    name: str


_POSTPONED: Any = _Mark("postponed")  # a value computed on a later stage, where its module lives
_DROPPED = _Mark("dropped")  # a value nothing later needs: it does not travel
_MARKS = {"missing": _MISSING, "skipped": _SKIPPED}


@dataclass(frozen=True)
class _Array:
    """A tensor as it travels: its bytes as a numpy array, which Ray hands over without pickling
    them (and a receiver on the same node reads from shared memory), with its dtype and shape."""

    data: Any
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _Array | torch.Tensor:
        if tensor.layout != torch.strided or tensor.is_quantized:
            return tensor
        flat = tensor.contiguous().reshape(-1)
        return cls(flat.view(torch.uint8).numpy(), str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))

    def tensor(self, device: torch.device) -> torch.Tensor:
        # A copy: what arrives may be read-only shared memory, and the graph may write to it.
        raw = torch.from_numpy(self.data.copy()) if self.data.size else torch.empty(0, dtype=torch.uint8)
        found = raw.view(getattr(torch, self.dtype)).reshape(self.shape)
        return found if found.device == device else found.to(device)


def _rebuilt(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """`value` with `leaf` applied to everything but its containers (a model output keeps its type)."""
    if isinstance(value, list):
        return [_rebuilt(v, leaf) for v in value]
    if isinstance(value, tuple):
        return tuple(_rebuilt(v, leaf) for v in value)
    if isinstance(value, dict):
        mapped = {k: _rebuilt(v, leaf) for k, v in value.items()}
        if type(value) is not dict:
            with contextlib.suppress(TypeError):
                return type(value)(**mapped)
        return mapped
    return leaf(value)


def _portable(value: Any) -> Any:
    """A value as it travels: tensors detached (an autograd graph never leaves its stage), on the CPU."""

    def leaf(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            found = item.detach()
            return _Array.of(found if found.device.type == "cpu" else found.cpu())
        if item is _MISSING:
            return _Mark("missing")
        return _Mark("skipped") if item is _SKIPPED else item

    return _rebuilt(value, leaf)


def _arrived(value: Any, device: torch.device) -> Any:
    def leaf(item: Any) -> Any:
        if isinstance(item, _Array):
            return item.tensor(device)
        if isinstance(item, torch.Tensor):
            return item if item.device == device else item.to(device)
        return _MARKS.get(item.name, item) if isinstance(item, _Mark) else item

    return _rebuilt(value, leaf)


class StagedInterleaver(Interleaver):
    """The interleaver on one stage: it hooks only the stage's modules, runs the graph as far as
    this stage's events allow, and hands its state on."""

    def __init__(self, *args: Any, plan: StagePlan, index: int, upstream: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.index = index
        self.counts_steps = index == 0
        self.postponed: list[int] = []
        self.live_values: dict[int, Any] = {}  # values computed on this stage, autograd intact
        self.boundary_in: torch.Tensor | None = None  # the hidden state this stage received
        self.boundary_out: torch.Tensor | None = None  # the one it handed on
        self.upstream: Callable[[int, torch.Tensor], None] | None = upstream
        self.device = torch.device("cpu")

    def _hooked(self) -> set[ModuleEvent]:
        return {e for e in self.wanted if self.plan.owner(e.path, e.side) == self.index}

    # -- the state --------------------------------------------------------------------------------
    def export(self) -> dict[str, Any]:
        needed = set(self.graph.saves)
        for node in self.nodes:
            if self.values[node.id] is _MISSING or self.values[node.id] is _POSTPONED:
                needed.update(self.deps[node.id])
        values = [
            _portable(v) if i in needed or v is _MISSING or v is _SKIPPED or v is _POSTPONED else _DROPPED
            for i, v in enumerate(self.values)
        ]
        return {
            "values": values,
            "threads": [(list(t.nodes), t.pc) for t in self.threads],
            "grad_threads": [(list(t.nodes), t.pc) for t in self.grad_threads],
            "grads": {k: _portable(v) for k, v in self._grads.items()},
            "postponed": list(self.postponed),
            "fired": set(self.fired),
            "step": self.step,
            "counts": dict(self.counts),
            "columns": dict(self.columns),
            "last_step": dict(self.last_step),
            "ending": self.ending,
        }

    def adopt(self, state: dict[str, Any], advance: bool = False) -> None:
        """Take over the run's state; `advance`: the run has reached this stage's forward, so what
        needs no event may run here (never mid-backward: the node running then is not done)."""
        self.values = [_arrived(v, self.device) for v in state["values"]]
        for thread, (nodes, pc) in zip(self.threads, state["threads"], strict=True):
            thread.nodes, thread.pc = list(nodes), pc
        for thread, (nodes, pc) in zip(self.grad_threads, state["grad_threads"], strict=True):
            thread.nodes, thread.pc = list(nodes), pc
        self._grads = {k: _arrived(v, self.device) for k, v in state["grads"].items()}
        self.postponed = list(state["postponed"])
        self.fired = set(state["fired"])
        self.step = state["step"]
        self.counts = dict(state["counts"])
        self.columns = dict(state["columns"])
        self.last_step = dict(state["last_step"])
        self.ending = state["ending"]
        self._retry_postponed()
        if advance and not self.ending:
            # What needs no event runs where its module is (a weight of stage 0 read by a graph
            # whose every event is on a later stage).
            self._advance(self.threads)

    # -- values that wait for a later stage --------------------------------------------------------
    def _here(self, node: Node) -> bool:
        if node.op == "call_module":
            return self.plan.holds(node.args[0], self.index)
        if node.op == "parameter":
            return self.plan.holds(str(node.args[0]).rpartition(".")[0], self.index)
        return True

    def _execute(self, node: Node) -> Any:
        waiting = [d for d in self.deps[node.id] if self.values[d] is _POSTPONED]
        if waiting or not self._here(node):
            if self.pin[node.id] is None and not self.ending:
                self.postponed.append(node.id)
                return _POSTPONED
            module = node.args[0] if not waiting else self.nodes[waiting[0]].args[0]
            raise self._error(node, self._too_far(str(module)))
        value = super()._execute(node)
        if self.needs_grad:
            self.live_values[node.id] = value
        return value

    def _too_far(self, module: str) -> str:
        return (
            f"this line needs model.{module}, which lives on another stage of this model's pipeline; "
            "a graph can use a module's weights only when the run has reached that module "
            "(use it on values from earlier layers, not later ones)"
        )

    def _retry_postponed(self) -> None:
        for nid in list(self.postponed):
            node = self.nodes[nid]
            if not self._here(node) or any(self.values[d] is _POSTPONED for d in self.deps[nid]):
                if self.ending:
                    raise self._error(node, self._too_far(str(node.args[0])))
                continue
            self.postponed.remove(nid)
            self.values[nid] = _MISSING
            self.values[nid] = self._execute(node)

    def _finish(self) -> None:
        self.ending = True
        self._retry_postponed()
        super()._finish()

    # -- gradients across stages -------------------------------------------------------------------
    def _activation(self, nid: int) -> Any:
        return self.live_values.get(nid, _MISSING)

    def _backward_from(
        self, backward: int, output: torch.Tensor, grad_output: Any, extra: list[torch.Tensor]
    ) -> list[Any]:
        boundary = self.boundary_in
        if boundary is None or not boundary.requires_grad or self.upstream is None:
            return super()._backward_from(backward, output, grad_output, extra)
        grads = super()._backward_from(backward, output, grad_output, [*extra, boundary])
        if grads and grads[-1] is not None:
            self.upstream(backward, grads[-1])  # the earlier stages' share, with this run's state
        return grads[:-1]

    def backward_upstream(self, backward: int, grad: torch.Tensor) -> None:
        """This stage's share of backward node `backward`, given the gradient of its output."""
        if self.boundary_out is None:
            return
        self._backward_from(backward, self.boundary_out, grad.to(self.boundary_out.device), [])


# -- a stage: one process's share of every run ------------------------------------------------------


class _Handoff(Exception):
    def __init__(self, hidden: torch.Tensor, collected: dict[str, Any] | None) -> None:
        super().__init__("handoff")
        self.hidden = hidden
        self.collected = collected


def _collector() -> dict[str, Any] | None:
    """What transformers is collecting for the model's output in this forward (attention weights,
    hidden states of every layer): each stage collects its own layers', and they travel on."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # an older transformers: nothing collected this way
        return None
    found = _active_collector.get()
    return found if isinstance(found, dict) else None


@dataclass
class RunSpec:
    """What every stage needs for a run, sent once per run."""

    graph: Graph
    tensors: dict[str, torch.Tensor]
    rows: list[tuple[int, int] | None]
    size: int
    seconds_left: float | None
    imports: dict[int, Any] | None
    isolated: bool
    cached: bool  # generation: each stage keeps a key/value cache for its layers
    attention_weights: bool = False


def _failure(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, NeedsSolo):
        return {"solo": str(exc)}
    if isinstance(exc, InterventionError):
        line = exc.line
        return {"error": exc.reason, "node": exc.node, "line": None if line is None else line.__dict__}
    return {"error": f"{type(exc).__name__}: {exc}", "node": None, "line": None}


def raise_failure(reply: dict[str, Any]) -> None:
    """Re-raise a stage's failure in the replica, at the user's line."""
    if "solo" in reply:
        raise NeedsSolo(reply["solo"])
    if "error" in reply:
        line = reply.get("line")
        raise InterventionError(reply["error"], None if line is None else SourceLine(**line), reply.get("node"))


_NO_RUN = {"error": "this stage has no run in progress (the replica restarted it)"}


class Stage:
    """One stage's model and its share of the run in progress. Every method returns a reply
    dict (the state, and "error" when the run failed here) rather than raising, so a failure
    crosses a process boundary as the user's line, not as a traceback."""

    def __init__(self, model: Any, plan: StagePlan, index: int) -> None:
        self.model = model
        self.plan = plan
        self.index = index
        self.previous: Any = None  # the stage before this one (a link), for gradients
        self.run: StagedInterleaver | None = None
        self.cache: Any = None
        self.output: Any = None
        self.spec: RunSpec | None = None
        params = [p for p in model.parameters() if p.device.type != "meta"]
        self.device = params[0].device if params else torch.device("cpu")
        start, stop = plan.ranges[index]
        blocks = model.get_submodule(plan.layers)
        self.first = blocks[start]
        self.next = blocks[stop] if stop < len(blocks) else None

    def begin(self, spec: RunSpec) -> dict[str, Any]:
        self.end()
        try:
            budget = None if spec.seconds_left is None else Budget(deadline=time.monotonic() + spec.seconds_left)
            tensors = {k: v.to(self.device) for k, v in spec.tensors.items()}
            run = StagedInterleaver(
                spec.graph, tensors, self.model, spec.rows, spec.size, budget, spec.imports, spec.isolated,
                plan=self.plan, index=self.index, upstream=self._upstream if self.index > 0 else None,
            )  # fmt: skip
            run.device = self.device
            run.__enter__()
            self.run, self.spec = run, spec
            if spec.cached:
                self.cache = _stage_cache(self.model, self.plan, self.index)
            return {}
        except Exception as exc:
            return _failure(exc)

    def forward(self, kwargs: dict[str, Any], state: dict[str, Any], hidden: torch.Tensor | None) -> dict[str, Any]:
        run, spec = self.run, self.spec
        if run is None or spec is None:
            return dict(_NO_RUN)
        handles = []
        try:
            with torch.enable_grad() if run.needs_grad else torch.no_grad():
                run.adopt(state, advance=True)  # what waited for this stage runs now, under the run's grad mode
            if hidden is not None:
                received = _arrived(hidden, self.device)
                if run.needs_grad:
                    received = received.detach().requires_grad_(True)
                run.boundary_in = received
                inject = _inject(received, state.get("collected"))
                handles.append(self.first.register_forward_pre_hook(inject, with_kwargs=True, prepend=True))
            if self.next is not None:
                handles.append(self.next.register_forward_pre_hook(_hand_off, with_kwargs=True, prepend=True))
            args = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            if self.cache is not None:
                args["cache"] = self.cache
            grad = torch.enable_grad() if run.needs_grad else torch.no_grad()
            reply: dict[str, Any] = {}
            with grad, _attention_switch(self.model, spec.attention_weights):
                try:
                    output = self.model(**args)
                except _Handoff as handoff:
                    run.boundary_out = handoff.hidden
                    reply["hidden"] = _portable(handoff.hidden)
                    reply["collected"] = _portable(handoff.collected)
                except EarlyStop:
                    reply["stopped"] = True
                else:
                    self.output = output
                    reply["output"] = _output_portable(output)
            reply["state"] = run.export()
            if reply.get("collected"):
                reply["state"]["collected"] = reply.pop("collected")
            return reply
        except Exception as exc:
            return _failure(exc)
        finally:
            for handle in reversed(handles):
                handle.remove()

    def forward_after(self, kwargs: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
        """This stage's forward, given the previous stage's reply (handed over stage to stage,
        never through the replica); a failure or an early stop passes through unchanged."""
        if "error" in previous or "solo" in previous or previous.get("stopped"):
            return previous
        return self.forward(kwargs, previous["state"], _arrived(previous.get("hidden"), self.device))

    def finish(self, state: dict[str, Any], final_output: Any) -> dict[str, Any]:
        """The end of the run (on the last stage): what waited for it runs; the saved values."""
        run = self.run
        if run is None:
            return dict(_NO_RUN)
        try:
            run.adopt(state)
            run.final_output = self.output if final_output is None else _arrived(final_output, self.device)
            with torch.enable_grad() if run.needs_grad else torch.no_grad():
                run._finish()
            return {"saved": _portable(run.saved())}
        except Exception as exc:
            return _failure(exc)

    def backward(self, state: dict[str, Any], backward: int, grad: Any) -> dict[str, Any]:
        run = self.run
        if run is None:
            return dict(_NO_RUN)
        try:
            run.adopt(state)
            with torch.enable_grad():
                run.backward_upstream(backward, _arrived(grad, self.device))
            return {"state": run.export()}
        except Exception as exc:
            return _failure(exc)

    def _upstream(self, backward: int, grad: torch.Tensor) -> None:
        run = self.run
        assert run is not None and self.previous is not None
        reply = self.previous.backward(run.export(), backward, _portable(grad))
        raise_failure(reply)
        run.adopt(reply["state"])

    def end(self) -> dict[str, Any]:
        if self.run is not None:
            self.run.__exit__()
        self.run = self.spec = self.cache = self.output = None
        for param in self.model.parameters():
            param.grad = None
        return {}


def _inject(hidden: torch.Tensor, earlier: dict[str, Any] | None) -> Callable[..., Any]:
    def hook(module: Any, args: Any, kwargs: Any) -> Any:
        collecting = _collector()
        if earlier and collecting is not None:
            # Earlier stages' layers come first in the model's output (their attention weights,
            # hidden states): as if one forward had collected them all.
            for key, values in earlier.items():
                if key in collecting and isinstance(values, list):
                    collecting[key][:0] = _arrived(values, hidden.device)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook


def _hand_off(module: Any, args: Any, kwargs: Any) -> Any:
    collecting = _collector()
    kept = {k: list(v) for k, v in collecting.items() if isinstance(v, list)} if collecting else None
    raise _Handoff(args[0] if args else kwargs["hidden_states"], kept)


def _output_portable(output: Any) -> Any:
    """The last stage's output for the replica (its key/value cache stays on the stage)."""
    if isinstance(output, dict) and "past_key_values" in output:
        output = copy.copy(output)
        output["past_key_values"] = None
    return _portable(output)


@contextlib.contextmanager
def _attention_switch(model: Any, wanted: bool) -> Iterator[None]:
    from .execute import _attention_weights

    with _attention_weights(model, wanted):
        yield


def _stage_cache(model: Any, plan: StagePlan, index: int) -> Any:
    """A key/value cache for this stage's layers; questions about the cache's length (masks,
    positions) are answered from the stage's first layer, since the others stay empty here."""
    from transformers import DynamicCache

    first, stop = plan.ranges[index]

    class StageCache(DynamicCache):
        def _own(self, layer_idx: int | None) -> int:
            return layer_idx if layer_idx is not None and first <= layer_idx < stop else first

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return int(super().get_seq_length(self._own(layer_idx)))

        def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> Any:
            return super().get_mask_sizes(query_length, self._own(layer_idx))

        def get_query_offset(self, layer_idx: int = 0) -> int:
            return int(super().get_query_offset(self._own(layer_idx)))

    return StageCache(config=model.config)


# -- the replica's side ------------------------------------------------------------------------------


class StageLink(Protocol):
    """A stage as the replica calls it: in this process, or a Ray actor."""

    def begin(self, spec: RunSpec) -> Any: ...  # pending: `result` gives the reply (stages start at once)
    def forward_after(self, kwargs: dict[str, Any], previous: Any) -> Any: ...
    def finish(self, state: dict[str, Any], final_output: Any) -> dict[str, Any]: ...
    def backward(self, state: dict[str, Any], backward: int, grad: Any) -> dict[str, Any]: ...
    def end(self) -> Any: ...
    def result(self, reply: Any) -> dict[str, Any]: ...


class LocalLink:
    """A stage in this process; what crosses is copied, as it would be between processes."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    def begin(self, spec: RunSpec) -> dict[str, Any]:
        return self.stage.begin(copy.deepcopy(spec))

    def forward_after(self, kwargs: dict[str, Any], previous: Any) -> Any:
        return copy.deepcopy(self.stage.forward_after(copy.deepcopy(kwargs), copy.deepcopy(previous)))

    def result(self, reply: Any) -> dict[str, Any]:
        return dict(reply)

    def finish(self, state: dict[str, Any], final_output: Any) -> dict[str, Any]:
        return copy.deepcopy(self.stage.finish(copy.deepcopy(state), copy.deepcopy(final_output)))

    def backward(self, state: dict[str, Any], backward: int, grad: Any) -> dict[str, Any]:
        return copy.deepcopy(self.stage.backward(copy.deepcopy(state), backward, copy.deepcopy(grad)))

    def end(self) -> dict[str, Any]:
        return self.stage.end()


def local_pipeline(source: str, tokenizer: Any, count: int, dtype: torch.dtype = torch.float32,
                   ranges: list[tuple[int, int]] | None = None) -> Pipeline:  # fmt: skip
    """A staged model whose stages all live in this process (tests, and trying a split)."""
    shell = shell_model(source, dtype)
    plan = StagePlan.of(shell, ranges) if ranges else StagePlan.balanced(shell, count)
    stages = [Stage(load_stage(source, plan, i, dtype), plan, i) for i in range(plan.count)]
    for earlier, later in itertools.pairwise(stages):
        later.previous = LocalLink(earlier)
    return Pipeline(shell, tokenizer, plan, [LocalLink(s) for s in stages])


class Pipeline:
    """A staged model as `run_graph` sees it: an adapter whose runs go through the stages."""

    def __init__(self, shell: Any, tokenizer: Any, plan: StagePlan, links: list[Any]) -> None:
        self.root = shell
        self.plan = plan
        self.links = links
        # The shell has no weights: inputs stay on the host, and each stage moves them to its device.
        self.lm = CausalLMAdapter(shell, tokenizer, device=torch.device("cpu"))

    def batch(self, invokes: list[tuple[list[Any] | None, dict[str, Any]]]) -> Batch:
        return self.lm.batch(invokes)

    def forward(self, batch: Batch) -> Any:
        return self.lm.forward(batch)

    def generate(
        self, batch: Batch, decodings: list[Decoding], on_end: Callable[[int, int], None] | None = None
    ) -> Any:
        return self.lm.generate(batch, decodings, on_end)

    def interleaver(
        self,
        graph: Graph,
        tensors: dict[str, torch.Tensor],
        rows: list[tuple[int, int] | None],
        size: int,
        budget: Budget | None,
        imports: dict[int, Any] | None,
        isolated: bool,
        attention_weights: bool = False,
    ) -> StagedRun:
        return StagedRun(self, graph, tensors, rows, size, budget, imports, isolated, attention_weights)


class StagedRun:
    """One run over the stages, in place of an `Interleaver` (the same `call`/`saved` surface)."""

    def __init__(self, pipeline: Pipeline, graph: Graph, tensors: dict[str, torch.Tensor],
                 rows: list[tuple[int, int] | None], size: int, budget: Budget | None,
                 imports: dict[int, Any] | None, isolated: bool, attention_weights: bool) -> None:  # fmt: skip
        self.pipeline = pipeline
        self.graph = graph
        self.budget = budget
        left = None if budget is None or budget.deadline is None else budget.deadline - time.monotonic()
        self.spec = RunSpec(graph, tensors, rows, size, left, imports, isolated, graph.kind == "generate",
                            attention_weights)  # fmt: skip
        # The state starts here, from an interleaver that plans but never hooks.
        self.state = StagedInterleaver(
            graph, tensors, pipeline.root, rows, size, budget, imports, isolated, plan=pipeline.plan, index=0
        ).export()
        if graph.kind == "generate":
            self.state["step"] = -1
        self.columns: dict[int, int] = {}
        self.last_step: dict[int, int] = {}
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StagedRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        links = self.pipeline.links
        with contextlib.suppress(Exception):
            for link, pending in zip(links, [link.end() for link in links], strict=True):
                link.result(pending)

    def call(self, run_model: Callable[[], Any]) -> Any:
        links = self.pipeline.links
        for link, pending in zip(links, [link.begin(self.spec) for link in links], strict=True):
            raise_failure(link.result(pending))
        shell = self.pipeline.root

        # Hugging Face's own loop (generate) drives the stages; it reads the forward's signature
        # to choose what to pass, so the stand-in has the model's.
        @functools.wraps(shell.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(*args, **kwargs)

        shell.forward = forward
        output = None
        try:
            with contextlib.suppress(EarlyStop):
                output = run_model()
        finally:
            del shell.forward
        final = output if self.graph.kind == "generate" else None
        self._sync()
        reply = self.pipeline.links[-1].finish(self.state, _portable(final))
        raise_failure(reply)
        self._saved = _arrived(reply["saved"], torch.device("cpu"))
        return output

    def _sync(self) -> None:
        self.state["last_step"].update(self.last_step)
        self.state["columns"].update(self.columns)

    def saved(self) -> dict[int, Any]:
        return self._saved

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.budget is not None:
            self.budget.check_time()
        cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
        kwargs.pop("return_dict", None)
        if args:
            kwargs["input_ids"] = args[0]
        self._sync()
        # Each stage's reply goes straight to the next stage (a Ray object reference: the hidden
        # state and the graph's values move stage to stage, not through this process).
        links = self.pipeline.links
        pending: Any = {"state": self.state}
        for link in links:
            pending = link.forward_after(kwargs, pending)
        reply = links[-1].result(pending)
        raise_failure(reply)
        self.state = reply["state"]
        if reply.get("stopped"):
            raise EarlyStop()
        output = _arrived(reply["output"], torch.device("cpu"))
        if cache is not None:
            # Hugging Face's loop reads the cache's length for positions: a cache of zero-width keys
            # with one entry per token tells it (the real caches stay on the stages).
            ids = kwargs["input_ids"]
            empty = torch.zeros(ids.shape[0], 1, ids.shape[1], 0)
            cache.update(empty, empty, 0)
            output["past_key_values"] = cache
        return output

