"""Run a graph on a model: the one entry point shared by local traces and the fabric's workers.

Usage::

    saved = run_graph(graph, tensors, CausalLMAdapter(hf_model, tokenizer))
    saved[node_id]       # each saved node's value

    saved = run_session([graph0, graph1], tensors, adapter)   # a session: one dict per trace
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import InterventionError
from ..graph.ir import Graph, Ref, TensorRef
from ..graph.leaves import map_leaves
from ..graph.tree import split_source
from .adapters import Batch
from .decoding import Decoding
from .devices import to_host
from .guards import Budget
from .interleaver import Interleaver
from .source import module_operations

_ATTENTION_CALL = "attention_interface"  # how transformers' attention modules name their kernel call


class Adapter(Protocol):
    root: torch.nn.Module

    def batch(
        self, invokes: list[tuple[list[Any] | None, dict[str, Any]]], jobs: list[tuple[int, int]] | None = None
    ) -> Batch: ...
    def forward(self, batch: Batch) -> Any: ...
    def generate(
        self, batch: Batch, decodings: list[Decoding], on_end: Callable[[int, int], None] | None = None
    ) -> Any: ...


class Run(Protocol):
    """One run of a graph alongside the model (an `Interleaver`, or a pipeline's run over stages)."""

    last_step: dict[int, int]
    columns: dict[int, int]

    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: Any) -> Any: ...
    def call(self, run_model: Callable[[], Any]) -> Any: ...
    def saved(self) -> dict[int, Any]: ...


@runtime_checkable
class StagedAdapter(Adapter, Protocol):
    """A model split into pipeline stages (the worker's `Pipeline`): its runs go through the
    stages, which each hook their own modules, instead of an interleaver here."""

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
    ) -> Run: ...


def _plain(value: Any) -> bool:
    kind = type(value)
    return kind is int or kind is str or (kind is list and all(_plain(item) for item in value))


def resolve_inputs(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """An invoke's inputs with the job's tensors in place of their references."""
    if _plain(value):
        return value  # token ids or texts: nothing to resolve (a merged batch has many)

    def leaf(item: Any) -> Any:
        if isinstance(item, TensorRef):
            return tensors[item.name]
        if isinstance(item, Ref):
            raise InterventionError("invoke inputs cannot refer to graph values")
        return item

    return map_leaves(value, leaf)


def run_session(
    graphs: list[Graph], tensors: dict[str, torch.Tensor], adapter: Adapter, budget: Budget | None = None
) -> list[dict[int, Any]]:
    """Run a session's traces in order; a later trace's `from_trace` nodes receive earlier values
    without them leaving the machine (or its GPU). Returns each trace's saved values, on the CPU."""
    needed: list[set[int]] = [set() for _ in graphs]
    for graph in graphs:
        for node in graph.nodes:
            if node.op == "from_trace":
                needed[node.args[0]].add(node.args[1])
    kept: list[dict[int, Any]] = []
    saved: list[dict[int, Any]] = []
    for index, graph in enumerate(graphs):
        imports = {n.id: kept[n.args[0]][n.args[1]] for n in graph.nodes if n.op == "from_trace"}
        extended = dataclasses.replace(graph, saves=sorted(set(graph.saves) | needed[index]))
        try:
            values = run_graph(extended, tensors, adapter, budget, imports)
        except InterventionError as exc:
            exc.trace = index if len(graphs) > 1 else None
            raise
        kept.append({k: _detached(v) for k, v in values.items() if k in needed[index]})  # stay where they are
        saved.append(to_host({k: v for k, v in values.items() if k in graph.saves}))
    return saved


def _detached(value: Any) -> Any:
    # A value crossing into the next trace starts a fresh autograd history there.
    return map_leaves(value, lambda leaf: leaf.detach() if isinstance(leaf, torch.Tensor) else leaf)


def run_graph(
    graph: Graph,
    tensors: dict[str, torch.Tensor],
    adapter: Adapter,
    budget: Budget | None = None,
    imports: dict[int, Any] | None = None,
    isolated: bool = False,
    spans: list[tuple[int, int, dict[str, Any]]] | None = None,
) -> dict[int, Any]:
    """Execute `graph` in one batched forward pass (or one generation); return saved values.
    `imports` are the values of its `from_trace` nodes, when it is part of a session; a
    `budget` bounds time and sizes (the fabric's); `isolated` is a merged run of several jobs,
    whose jobs `spans` gives: (first invoke, invoke after its last, options); a merged trace
    lays each job out as alone (prompts of different lengths: each job sees its own columns)."""
    jobs = [(first, stop) for first, stop, _ in spans] if spans and graph.kind == "trace" else None
    batch = _batch(graph, tensors, adapter, budget, jobs)
    scan = bool(graph.options.get("scan"))
    attention = bool(batch.kwargs.get("output_attentions")) or reads_attention_weights(graph, adapter.root)
    staged = isinstance(adapter, StagedAdapter)
    run: Run
    if isinstance(adapter, StagedAdapter):
        if scan:
            raise InterventionError("a model split into pipeline stages cannot be scanned; run a trace instead")
        run = adapter.interleaver(graph, tensors, batch.rows, batch.size, budget, imports, isolated, attention)
    else:
        run = Interleaver(graph, tensors, adapter.root, batch.rows, batch.size, budget, imports, isolated, batch.windows)
    with eager_attention(adapter.root, attention and not staged), _fake(scan):
        with run:
            if graph.kind == "generate":
                _generate(run, adapter, batch, spans or [(0, len(graph.invokes), graph.options)])
            else:
                run.call(lambda: adapter.forward(batch))
        saved = run.saved()
    return map_leaves(saved, _as_meta) if scan else saved


def _batch(
    graph: Graph,
    tensors: dict[str, torch.Tensor],
    adapter: Adapter,
    budget: Budget | None,
    jobs: list[tuple[int, int]] | None = None,
) -> Batch:
    """The invokes' inputs as one batch, with the graph's forward keywords."""
    invokes = [
        (None if inv.args is None else resolve_inputs(inv.args, tensors), resolve_inputs(inv.kwargs, tensors))
        for inv in graph.invokes
    ]
    try:
        batch = adapter.batch(invokes, jobs) if jobs is not None else adapter.batch(invokes)
    except (ValueError, TypeError) as exc:
        raise InterventionError(f"bad inputs: {exc}") from exc
    if budget is not None:
        budget.check_time()  # tokenizing is paid before the model runs
    if graph.kind == "trace" and "input_ids" in batch.kwargs:
        # A single forward pass needs no key/value cache: it only costs memory, and its object
        # spans every row (merged runs) and cannot be saved.
        batch.kwargs["use_cache"] = False
    batch.kwargs.update(resolve_inputs(graph.options.get("forward", {}), tensors))
    if graph.options.get("scan"):
        if graph.kind == "generate":
            raise InterventionError("a scan covers one forward pass: scan the prompt with model.scan(prompt)")
        if "input_ids" in batch.kwargs and batch.kwargs.get("attention_mask") is None:
            # Without a mask, transformers looks into the ids for padding: data a scan does not have.
            batch.kwargs["attention_mask"] = torch.ones_like(batch.kwargs["input_ids"])
    return batch


def _generate(run: Run, adapter: Adapter, batch: Batch, jobs: list[tuple[int, int, dict[str, Any]]]) -> None:
    """One `generate` for every job of the batch, each told where its own generation ends."""
    width = int(batch.kwargs["input_ids"].shape[1])

    def ended(job: int, step: int) -> None:
        # As when the job runs alone: no later steps for its invokes, and its ids end here.
        first, stop, _ = jobs[job]
        run.last_step.update(dict.fromkeys(range(first, stop), step))
        run.columns.update(dict.fromkeys(range(first, stop), width + step + 1))

    decodings = _decodings(jobs, batch)
    run.call(lambda: adapter.generate(batch, decodings, ended))


def _decodings(spans: list[tuple[int, int, dict[str, Any]]], batch: Batch) -> list[Decoding]:
    """Each job's decoding over the rows of its invokes."""
    found = []
    for first, stop, options in spans:
        rows = [r for r in batch.rows[first:stop] if r is not None]
        start, end = (min(r[0] for r in rows), max(r[1] for r in rows)) if rows else (0, batch.size)
        found.append(Decoding.of(options, start, end))
    return found


@contextlib.contextmanager
def _fake(enabled: bool) -> Iterator[None]:
    """A scan: every tensor op computes only shapes and dtypes (fake tensors; the weights are
    seen as fakes too, never copied), so it costs no FLOPs and no activation memory."""
    if not enabled:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensorMode, UnsupportedFakeTensorException

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    except (UnsupportedFakeTensorException, RuntimeError, NotImplementedError) as exc:
        if isinstance(exc, InterventionError):
            raise
        raise InterventionError(f"the scan failed: {type(exc).__name__}: {exc}") from exc


def _as_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return value


_ATTENTION_PATHS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def _attention_call(root: torch.nn.Module, path: str) -> bool:
    """Whether `path` is a module that calls an attention interface (its output is
    `(attention output, weights)`), or that call itself in its `.source` (cached per model)."""
    known = _ATTENTION_PATHS.setdefault(root, {})
    if path not in known:
        split = split_source(path)
        module_path, operation = split if split else (path, None)
        try:
            module = root.get_submodule(module_path)
        except AttributeError:
            module = None
        known[path] = (
            module is not None
            and (operation is None or operation.startswith(_ATTENTION_CALL))
            and any(op.name.startswith(_ATTENTION_CALL) for op in module_operations(module))
        )
    return known[path]


def reads_attention_weights(graph: Graph, root: torch.nn.Module) -> bool:
    """Whether the graph may read attention weights: it uses an attention module's output (or
    its attention call's) any other way than `[0]`, the attention output itself (`[1]`, the
    whole tuple, a save, `tracer.cache`). Fused kernels (sdpa, flash) give None there, so such a
    run switches to eager attention, as `output_attentions=True` does."""
    reads = {n.id for n in graph.nodes if n.op == "output" and isinstance(n.args[0], str) and _attention_call(root, n.args[0])}
    if not reads:
        return False
    if reads & set(graph.saves):
        return True
    for node in graph.nodes:
        for ref in node.refs():
            if ref in reads and not (node.op == "getitem" and node.args[0] == Ref(ref) and node.args[1] == 0):
                return True
    return False


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module, wanted: bool) -> Iterator[None]:
    """Fused attention kernels (sdpa, flash) return no weights: for a run that asks for them,
    eager attention (slower, and more memory: batch x heads x seq x seq per layer), then back."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    if not wanted or current in (None, "eager") or switch is None:
        yield
        return
    switch("eager")
    try:
        yield
    finally:
        switch(current)
