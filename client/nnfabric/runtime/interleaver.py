"""Runs an intervention graph alongside the model's own forward pass, from module hooks.

Usage::

    with Interleaver(graph, tensors, root, rows, batch_size) as run:
        output = run.call(lambda: root(**batch_kwargs))
    saved = run.saved()

Each invoke is a thread of nodes in program order with its own position. When the model
reaches a module the graph touches, a hook hands the value to the interleaver, which advances
every thread as far as the values available allow. A node pinned to a module event runs only
while that event is live; one whose event has passed fails fast at the user's line. Nodes that
need gradients run from tensor hooks while `.backward()` runs. Hooks sit only on the modules
the graph touches and are removed, in reverse order, when the run ends.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from ..errors import InterventionError
from ..graph.ir import DType, Graph, Node, Ref, TensorRef
from ..graph.leaves import map_leaves
from ..graph.tree import SOURCE, split_source
from .devices import aligned, first_device, input_device, module_device, to_device
from .guards import Budget, NeedsSolo
from .source import instrumented
from .torch_ops import SIMPLE, dtype_of

# A node's value before it runs, and that of a node whose generation step never happened.
MISSING: Any = object()
SKIPPED: Any = object()

Side = Literal["in", "out"]


@dataclass(frozen=True)
class ModuleEvent:
    """A module's input ("in") or output ("out") at one call of one generation step."""

    path: str
    side: Side
    step: int
    call: int


@dataclass(frozen=True)
class GradEvent:
    """The gradient of the activation that node `node` read arrives, during backward node `backward`."""

    node: int
    backward: int


@dataclass(frozen=True)
class EndEvent:
    """The model's forward pass (or generation) has returned."""


EventKey = ModuleEvent | GradEvent | EndEvent
_END = EndEvent()
_READS: dict[str, Side] = {"output": "out", "input": "in", "inputs": "in"}
_WRITES: dict[str, Side] = {"set_output": "out", "set_input": "in", "set_inputs": "in"}
_GRAD_OPS = {"grad", "set_grad"}
_LITERALS = frozenset({str, int, float, bool, type(None)})
_ALIGNED = {"binary", "unary", "call_method", "call_function", "getitem", "setitem", "set_grad", "backward"}


def _storage(tensor: torch.Tensor) -> int:
    """The storage a tensor's data lives in (its views share it), to recognise shared or
    read-only values; for the data-less fake tensors of a scan too."""
    return int(tensor.untyped_storage()._cdata)


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a value of `shape` can be written into a slot of shape `target`."""
    if len(shape) > len(target):
        return all(size == 1 for size in shape[: len(shape) - len(target)]) and _broadcasts(
            shape[len(shape) - len(target) :], target
        )
    return all(size in (1, want) for size, want in zip(shape, target[len(target) - len(shape) :], strict=True))


@dataclass(frozen=True)
class Columns:
    """An invoke's own columns when jobs of different prompt lengths share a batch: every
    dimension (after the batch's) of `size`, the batch's sequence length, is cut to
    [start, stop), so that position 0 is the job's first token and -1 its last, as alone.
    The batch's length is chosen to differ from every other size the model uses (hidden,
    heads, vocabulary...), so a sequence dimension is known by its size."""

    size: int
    start: int
    stop: int

    def cut(self, tensor: torch.Tensor) -> torch.Tensor:
        for dim in range(1, tensor.dim()):
            if tensor.shape[dim] == self.size:
                tensor = tensor.narrow(dim, self.start, self.stop - self.start)
        return tensor


Rows = tuple[int, int] | None
Place = tuple[Rows, Columns | None]  # an invoke's rows of the batch, and its columns if cut


class EarlyStop(Exception):
    """Raised from a hook by `tracer.stop()` to end the forward pass."""


class _Thread:
    __slots__ = ("nodes", "pc")

    def __init__(self) -> None:
        self.nodes: list[int] = []
        self.pc = 0


def _describe(key: EventKey) -> str:
    if isinstance(key, EndEvent):
        return "the end of the model's run"
    if isinstance(key, GradEvent):
        return f"the gradient of node {key.node} (backward at node {key.backward})"
    where = f"model.{key.path}" if key.path else "the model"
    what = "output" if key.side == "out" else "input"
    detail = f"call {key.call}" + (f", generation step {key.step}" if key.step else "")
    return f"{where} {what} ({detail})"


class Interleaver:
    def __init__(
        self,
        graph: Graph,
        tensors: dict[str, torch.Tensor],
        root: torch.nn.Module,
        rows: list[tuple[int, int] | None],
        batch_size: int,
        budget: Budget | None = None,
        imports: dict[int, Any] | None = None,
        isolated: bool = False,
        windows: dict[int, Columns] | None = None,
    ) -> None:
        self.graph = graph
        self.imports = imports or {}
        self.budget = budget
        # A merged run of several jobs: every read and write must stay inside the job's rows.
        self.isolated = isolated
        self._shared: set[int] = set()  # storages of per-job copies of values without a batch dimension
        self._read_only: set[int] = set()  # storages of the model's parameters read by the graph
        self.nodes = graph.nodes
        self.tensors = tensors
        self.root = root
        self.device = input_device(root)  # where a job's own tensors go (a stage: its own device)
        self.rows = rows
        self.batch_size = batch_size
        self.windows = windows or {}  # invoke -> its own columns (a merged batch of mixed lengths)
        # Among other jobs' interleavers (a merged generation): the copies written in this pass,
        # shared (the first writer copies, the next write into it); a hook's failure, kept.
        self.fresh: dict[int, torch.Tensor] | None = None
        self.contained, self.failure = False, cast(BaseException | None, None)
        count = len(self.nodes)
        self.values: list[Any] = [MISSING] * count
        self.pin: list[EventKey | None] = [None] * count
        self.deps: list[list[int]] = [n.refs() for n in self.nodes]
        self.threads: list[_Thread] = [_Thread() for _ in graph.invokes]
        self.grad_threads: list[_Thread] = [_Thread() for _ in graph.invokes]
        self.fired: set[EventKey] = set()
        self.live: set[EventKey] = set()
        self.step, self.counts = 0, cast(dict[tuple[str, str], int], {})
        self.bypass = self.ending = False
        self.final_output: Any = None
        self.columns: dict[int, int] = {}  # invoke -> columns of the generated ids that are its job's
        self.last_step: dict[int, int] = {}  # invoke -> its job's last generation step (merged runs)
        self._event_value: Any = None
        # A merged run's writes to the live module output, by invoke: applied together at the end.
        self._written: dict[int, Any] = {}
        self._grads: dict[tuple[int, int], Any] = {}  # (source node, backward node) -> its gradient (rows)
        self._backward_of: dict[int, int] = {}  # .grad node -> the backward call it belongs to
        self._backward_now = -1
        self._calls = [n for n in self.nodes if n.op == "backward"]
        self._grad_state: dict[str, Any] = {}
        self._row_base: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        self._keep: list[Any] = []  # views handed out, and (`_read`) the ids of the values they view
        self._read: set[int] = set()
        self._handles: list[Any] = []
        self._instrumented = contextlib.ExitStack()  # modules whose forward `.source` reads run rewritten
        self.wanted: set[ModuleEvent] = set()
        self.needs_grad = any(n.op in _GRAD_OPS or n.op == "backward" for n in self.nodes)
        self._plan()

    # -- planning ------------------------------------------------------------------------
    def _plan(self) -> None:
        anchor: list[EventKey | None] = [None] * len(self.nodes)
        deferred = [False] * len(self.nodes)
        for node in self.nodes:
            nid = node.id
            if node.op in _READS or node.op in _WRITES:
                side = _READS.get(node.op) or _WRITES[node.op]
                key = ModuleEvent(node.args[0], side, node.args[1], node.args[2])
                self.pin[nid] = key
                self.wanted.add(key)
                if node.op in _READS:
                    anchor[nid] = key
            elif node.op in ("getitem", "getattr") and isinstance(node.args[0], Ref):
                anchor[nid] = anchor[node.args[0].id]
            elif node.op == "setitem" and isinstance(node.args[0], Ref):
                # An in-place edit of an activation must happen while the model holds it.
                self.pin[nid] = anchor[node.args[0].id]
            elif node.op == "model_output":
                self.pin[nid] = _END
            if node.op in _GRAD_OPS:
                self._backward_of[nid] = self._bind_backward(node)
                self.pin[nid] = GradEvent(node.args[0].id, self._backward_of[nid])
                deferred[nid] = True
            elif any(deferred[d] for d in self.deps[nid]):
                deferred[nid] = True
            if node.unordered and node.op in _READS and not deferred[nid]:
                self.threads.append(_Thread())  # a thread of its own: no program order to wait for
                self.threads[-1].nodes.append(nid)
                continue
            (self.grad_threads if deferred[nid] else self.threads)[node.invoke].nodes.append(nid)

    def _bind_backward(self, node: Node) -> int:
        """The backward call whose gradient a `.grad` node means: the latest one before it in its
        invoke (a read after a backward), else the next one (a read written before the call);
        backward calls of other invokes only when its own invoke has none."""
        own = [n for n in self._calls if n.invoke == node.invoke] or self._calls
        before = [n.id for n in own if n.id < node.id]
        after = [n.id for n in own if n.id > node.id]
        return before[-1] if before else (after[0] if after else -1)

    # -- running -------------------------------------------------------------------------
    def __enter__(self) -> Interleaver:
        try:
            self._install()
        except BaseException:
            self.__exit__()  # a model must never keep hooks (or a rewritten forward) of a run that did not start
            raise
        return self

    def _install(self) -> None:
        root = self.root
        if self.graph.kind == "generate" and self.counts_steps:
            self._handles.append(root.register_forward_pre_hook(self._step_hook, prepend=True))
        sides: dict[str, set[str]] = {}
        for event in self.hooked():
            sides.setdefault(event.path, set()).add(event.side)
        operations: dict[str, dict[str, set[str]]] = {}  # module path -> operation -> sides
        for path, which in sides.items():
            split = split_source(path)
            if split is not None:
                operations.setdefault(split[0], {})[split[1]] = which
                continue
            module = root.get_submodule(path)
            if "in" in which:
                hook = functools.partial(self._input_hook, path)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            if "out" in which:
                self._handles.append(module.register_forward_hook(functools.partial(self._output_hook, path)))
        for path, wanted_ops in operations.items():
            on_call = functools.partial(self._operation, f"{path}.{SOURCE}." if path else f"{SOURCE}.", wanted_ops)
            self._instrumented.enter_context(instrumented(root.get_submodule(path), on_call))
        if self.graph.kind == "generate":
            self.step = -1

    counts_steps = True  # a pipeline stage after the first leaves the step count to the first

    def hooked(self) -> set[ModuleEvent]:
        """The events to hook here (a pipeline stage hooks only the modules it holds)."""
        return self.wanted

    def __exit__(self, *exc: Any) -> None:
        self._instrumented.close()
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()

    def call(self, run_model: Callable[[], Any]) -> Any:
        """Run the model, then everything left in the graph; return the model's output."""
        grad = torch.enable_grad() if self.needs_grad else torch.no_grad()
        output = None
        with grad:
            with contextlib.suppress(EarlyStop):
                output = run_model()
            self.final_output = output
            self.finish()
        return output

    def saved(self) -> dict[int, Any]:
        found = {}
        for nid in self.graph.saves:
            value = self.values[nid]
            if value is not MISSING and value is not SKIPPED:
                found[nid] = value
        return found

    def finish(self) -> None:
        self.ending = True
        self.live = {_END}
        self.fired.add(_END)
        self._advance(self.threads)
        self._advance_dataflow(self.grad_threads)

    # -- hooks ---------------------------------------------------------------------------
    def _step_hook(self, module: Any, args: Any) -> None:
        if not self.bypass:
            self.step += 1
            self.counts.clear()

    def _count(self, path: str, side: Side) -> ModuleEvent:
        slot = (path, side)
        call = self.counts.get(slot, 0)
        self.counts[slot] = call + 1
        return ModuleEvent(path, side, max(self.step, 0), call)

    def _input_hook(self, path: str, module: Any, args: Any, kwargs: Any) -> Any:
        if self.bypass:
            return None
        key = self._count(path, "in")
        if key not in self.wanted:
            return None
        original = (args, kwargs)
        result = self._contained_event(key, original)
        return None if result is original else result

    def _output_hook(self, path: str, module: Any, args: Any, output: Any) -> Any:
        if self.bypass:
            return None
        key = self._count(path, "out")
        if key not in self.wanted:
            return None
        result = self._contained_event(key, output)
        return None if result is output else result

    def _contained_event(self, key: ModuleEvent, value: Any) -> Any:
        if not self.contained:
            return self._event(key, value)
        try:
            return self._event(key, value)
        except Exception as exc:  # this job's failure: its rows stay as they were, the pass goes on
            self.failure = exc
            self.bypass = True
            return value

    def _operation(
        self,
        prefix: str,
        wanted: dict[str, set[str]],
        name: str,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """One call inside an instrumented forward: an event like a module's input and output."""
        which = wanted.get(name)
        if which is None:
            return fn(*args, **kwargs)
        path = prefix + name
        if "in" in which:
            replaced = self._input_hook(path, None, args, kwargs)
            if replaced is not None:
                args, kwargs = replaced
        output = fn(*args, **kwargs)
        if "out" in which:
            replaced = self._output_hook(path, None, args, output)
            if replaced is not None:
                output = replaced
        return output

    def _event(self, key: ModuleEvent, value: Any) -> Any:
        if self.budget is not None:
            self.budget.check_time()
        outer_live, outer_value, outer_written = self.live, self._event_value, self._written
        self.live = {key}
        self._event_value = value
        self._written = {}
        self.fired.add(key)
        try:
            self._advance(self.threads)
            for thread in self.threads:
                waiting = thread.nodes[thread.pc] if thread.pc < len(thread.nodes) else None
                if waiting is not None and self.pin[waiting] == key and not self._past_end(self.nodes[waiting], key):
                    self._stuck(waiting, key)
            if self._written:
                return self._write_rows(self._event_value, [(self._place(i), new) for i, new in self._written.items()])
            return self._event_value
        finally:
            self.live, self._event_value, self._written = outer_live, outer_value, outer_written

    def _stuck(self, nid: int, key: EventKey) -> None:
        missing = [d for d in self.deps[nid] if self.values[d] is MISSING]
        node = self.nodes[nid]
        if missing:
            src = self.nodes[missing[0]]
            where = f" (line {src.line.line})" if src.line else ""
            raise self._error(
                node,
                f"this line needs a value{where} that is not available yet when the model reaches "
                f"{_describe(key)}; a value can only be used at or after the point where the model "
                "produces it",
            )
        raise self._error(node, f"this line could not run at {_describe(key)}")

    # -- the threads -----------------------------------------------------------------------
    def _advance(self, threads: list[_Thread]) -> None:
        progress = True
        while progress:
            progress = False
            for thread in threads:
                nodes = thread.nodes
                while thread.pc < len(nodes):
                    if not self._try(nodes[thread.pc]):
                        break
                    thread.pc += 1
                    progress = True

    def _advance_dataflow(self, threads: list[_Thread]) -> None:
        """Gradient nodes run as their gradients arrive, which is the reverse of program order."""
        progress = True
        while progress:
            progress = False
            for thread in threads:
                waiting = [nid for nid in thread.nodes if not self._try(nid)]
                progress = progress or len(waiting) < len(thread.nodes)
                thread.nodes = waiting

    def _try(self, nid: int) -> bool:
        if self.values[nid] is not MISSING:
            return True  # a stop node that already ended the forward pass
        node = self.nodes[nid]
        key = self.pin[nid]
        if self._past_end(node, key):
            # Its job's own generation had ended before this step: as alone, the step never happens.
            if not self.ending:
                return False
            if node.optional:
                self.values[nid] = SKIPPED
                return True
            raise self._error(node, f"{_describe(key)} never happened: the model did not reach it in this run")  # type: ignore[arg-type]
        if key is not None and key not in self.live:
            if not self.ending and key not in self.fired:
                return False
            if node.optional and key not in self.fired:
                self.values[nid] = SKIPPED
                return True
            raise self._error(node, self._why_not_live(node, key))
        for dep in self.deps[nid]:
            value = self.values[dep]
            if value is MISSING:
                if not self.ending:
                    return False
                src = self.nodes[dep]
                where = f" from line {src.line.line}" if src.line else ""
                raise self._error(node, f"this line needs a value{where} that was never computed")
            if value is SKIPPED:
                if node.optional:
                    self.values[nid] = SKIPPED
                    return True
                raise self._error(node, "this line uses a value from a generation step that did not happen")
        self.values[nid] = self.execute(node)
        return True

    def _past_end(self, node: Node, key: EventKey | None) -> bool:
        last = self.last_step.get(node.invoke)
        return last is not None and isinstance(key, ModuleEvent) and key.step > last

    def _why_not_live(self, node: Node, key: EventKey) -> str:
        if isinstance(key, GradEvent):
            return (
                "this gradient was never computed: call .backward() inside the trace on a value "
                "that depends on this activation"
            )
        if key in self.fired:
            if node.op == "setitem":
                return f"this edit comes too late: {_describe(key)} has already been used by the model"
            return (
                f"{_describe(key)} was already computed when this line ran: within one invoke, "
                "read modules in the order the model calls them"
            )
        return f"{_describe(key)} never happened: the model did not reach it in this run"

    def _error(self, node: Node, message: str) -> InterventionError:
        return InterventionError(message, node.line, node.id)

    # -- executing one node -------------------------------------------------------------------
    def _resolve(self, value: Any) -> Any:
        kind = type(value)
        if kind is Ref:
            return self.values[value.id]
        if kind in _LITERALS:
            return value
        return map_leaves(value, self._resolve_leaf)

    def _resolve_leaf(self, leaf: Any) -> Any:
        if isinstance(leaf, Ref):
            return self.values[leaf.id]
        if isinstance(leaf, TensorRef):
            tensor = self.tensors[leaf.name]
            if tensor.device != self.device:
                # A job's tensors arrive on the CPU: moved once to where the model computes.
                tensor = self.tensors[leaf.name] = tensor.to(self.device)
            return tensor
        if isinstance(leaf, DType):
            return dtype_of(leaf.name)
        return leaf

    def execute(self, node: Node) -> Any:
        try:
            args = [self._resolve(a) for a in node.args]
            kwargs = {k: self._resolve(v) for k, v in node.kwargs.items()}
            if self.budget is not None:
                self.budget.check_time()
                self.budget.check_op(node.op, args, kwargs)
            args, kwargs = self._placed(node.op, args, kwargs)
            value = self._dispatch(node, args, kwargs)
            if self.budget is not None:
                self.budget.check_value(value)
            return value
        except (EarlyStop, InterventionError, NeedsSolo):
            raise
        except Exception as exc:
            raise self._error(node, f"{type(exc).__name__}: {exc}") from exc

    def _placed(self, op: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """The op's values on the device that consumes them: a written value where the module's
        value is, a module's arguments where the module computes, otherwise one device per op."""
        if op in _WRITES:
            target = first_device(self._event_value)
            if target is not None:
                args = [*args[:3], to_device(args[3], target)]
            return args, kwargs
        if op == "call_module":
            target = module_device(self.root.get_submodule(args[0]))
            if target is None:
                return args, kwargs
            return [args[0], *to_device(args[1:], target)], to_device(kwargs, target)
        if op in _ALIGNED:
            return aligned(op, args, kwargs)
        return args, kwargs

    def _dispatch(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Run one op: the ops that need the run's state through this class's table (one method
        each), the others through the registry's plain table (`torch_ops.SIMPLE`)."""
        handler = _STATEFUL.get(node.op)
        if handler is not None:
            return handler(self, node, args, kwargs)
        return SIMPLE[node.op](args, kwargs)

    # -- the ops that need the run's state -----------------------------------------------------
    def _op_output(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if node.invoke in self._written:
            return self._written[node.invoke]  # read after its own write, as alone: the value it wrote
        return self._slice_rows(self._event_value, self._place(node.invoke))

    def _op_input(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        call_args, call_kwargs = self._event_value
        first = call_args[0] if call_args else next(iter(call_kwargs.values()))
        return self._slice_rows(first, self._place(node.invoke))

    def _op_inputs(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return self._slice_rows(self._event_value, self._place(node.invoke))

    def _op_set_output(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
        place = self._place(node.invoke)
        if self.isolated and place[0] is not None:
            # Checked now, at the job's own line; written into one copy with the others' at the end.
            self._check_fits(self._event_value, args[3], place)
            self._written[node.invoke] = args[3]
            return
        self._event_value = self._merge_rows(self._event_value, args[3], place)

    def _op_set_inputs(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
        self._event_value = self._merge_rows(self._event_value, args[3], self._place(node.invoke))

    def _op_set_input(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
        rows = self._place(node.invoke)
        call_args, call_kwargs = self._event_value
        if call_args:
            call_args = (self._merge_rows(call_args[0], args[3], rows), *call_args[1:])
        else:
            name = next(iter(call_kwargs))
            call_kwargs = {**call_kwargs, name: self._merge_rows(call_kwargs[name], args[3], rows)}
        self._event_value = (call_args, call_kwargs)

    def _writable(self, node: Node, target: Any) -> None:
        """An in-place write may not touch the model's weights, nor (merged) a value every row shares."""
        if isinstance(target, torch.Tensor):
            storage = _storage(target)
            if storage in self._read_only:
                raise InterventionError(
                    "the model's parameters cannot be changed in a trace; edit a copy (w.clone()) and use it"
                )
            if self.isolated and storage in self._shared:
                raise NeedsSolo(f"node {node.id} writes into a value every row shares")

    def _op_setitem(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
        self._writable(node, args[0])
        SIMPLE["setitem"](args, kwargs)

    def _op_call_method(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if args[0].endswith("_"):  # an in-place method (zero_)
            self._writable(node, args[1])
        return SIMPLE["call_method"](args, kwargs)

    def _op_call_module(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        module = self.root.get_submodule(args[0])
        self.bypass = True
        try:
            return module(*args[1:], **kwargs)
        finally:
            self.bypass = False

    def _op_model_output(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        value = self._slice_rows(self.final_output, self._place(node.invoke))
        length = self.columns.get(node.invoke)
        if length is not None and isinstance(value, torch.Tensor) and value.dim() == 2:
            value = value[:, :length]
        return value

    def _op_parameter(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        try:
            param = self.root.get_parameter(args[0])
        except AttributeError:
            raise InterventionError(f"the model has no parameter {args[0]!r}") from None
        # The model's own weights, shared by every job: readable, never writable here.
        weight = param.detach()
        self._read_only.add(_storage(weight))
        return weight

    def _op_from_trace(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if node.id not in self.imports:
            raise InterventionError("a value from another trace can only be used inside model.session()")
        return self.imports[node.id]

    def _op_stop(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
        self.values[node.id] = None
        raise EarlyStop()

    def _op_backward(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
        self._backward(node, args)

    def _op_grad(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return self._grads[(node.args[0].id, self._backward_of[node.id])]

    def _op_set_grad(self, node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
        self._set_grad(node.args[0].id, args[1])

    # -- batch rows ----------------------------------------------------------------------------
    def _place(self, invoke: int) -> Place:
        return self.rows[invoke], self.windows.get(invoke)

    def _slice_rows(self, value: Any, place: Place) -> Any:
        rows, window = place
        if rows is None:
            return value
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] != self.batch_size:
                if not self.isolated:
                    return value
                if value.dim() > 1 and value.shape[0] > self.batch_size and value.shape[0] % self.batch_size == 0:
                    # Rows of every job flattened together (a router's [batch x tokens, experts]):
                    # not this job's to read merged.
                    raise NeedsSolo(f"a value of shape {tuple(value.shape)} mixes every job's rows")
                # Every row's value: this job reads a copy, and writing into it needs a solo run.
                copy = value.clone()
                self._shared.add(_storage(copy))
                self._keep.append(copy)
                return copy if window is None else window.cut(copy)
            view = value[rows[0] : rows[1]]
            if window is not None:
                view = window.cut(view)
            self._row_base[id(view)] = (value, rows)
            self._read.add(id(value))
            self._keep.append(view)
            return view
        if isinstance(value, tuple):
            return tuple(self._slice_rows(v, place) for v in value)
        if isinstance(value, list):
            return [self._slice_rows(v, place) for v in value]
        if isinstance(value, dict):
            return {k: self._slice_rows(v, place) for k, v in value.items()}
        if self.isolated and not (value is None or isinstance(value, (bool, int, float, str, torch.dtype))):
            raise NeedsSolo(f"a {type(value).__name__} is not split by rows")
        return value

    def _own(self, tensor: torch.Tensor, place: Place) -> torch.Tensor:
        """The invoke's rows (and columns) of a batched tensor, as a view to write through."""
        rows, window = place
        assert rows is not None
        view = tensor[rows[0] : rows[1]]
        return view if window is None else window.cut(view)

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of a module's value to write into: one per forward pass for all jobs sharing it."""
        if self.fresh is not None and self.fresh.get(id(tensor)) is tensor and id(tensor) not in self._read:
            return tensor  # another job's copy this pass, which this job has not read: write into it
        copy = tensor.clone()
        if self.fresh is not None:
            self.fresh[id(copy)] = copy
        return copy

    def _check_fits(self, current: Any, new: Any, place: Place) -> None:
        """Raise as `_merge_rows` would if `new` cannot be written into these rows of `current`."""
        if isinstance(current, torch.Tensor):
            if current.dim() == 0 or current.shape[0] != self.batch_size:
                raise NeedsSolo("a write to a value every row shares")
            target = self._own(current, place)
            if isinstance(new, torch.Tensor) and not _broadcasts(tuple(new.shape), tuple(target.shape)):
                raise RuntimeError(f"the value of shape {tuple(new.shape)} cannot be written into rows of shape "
                                   f"{tuple(target.shape)}")  # fmt: skip
            return
        if isinstance(current, (tuple, list)) and isinstance(new, (tuple, list)) and len(current) == len(new):
            for c, n in zip(current, new, strict=True):
                self._check_fits(c, n, place)
            return
        if isinstance(current, dict) and isinstance(new, dict):
            for name, item in new.items():
                self._check_fits(current.get(name), item, place)
            return
        raise TypeError(f"cannot write a {type(new).__name__} into one invoke's rows of a {type(current).__name__}")

    def _write_rows(self, current: Any, writes: list[tuple[Place, Any]]) -> Any:
        """`current` with each write's rows replaced: one copy of each tensor for all of them."""
        if isinstance(current, torch.Tensor):
            merged = self._copy(current)
            for place, new in writes:
                self._own(merged, place)[...] = new
            return merged
        if isinstance(current, (tuple, list)):
            return type(current)(
                self._write_rows(c, [(place, new[i]) for place, new in writes]) for i, c in enumerate(current)
            )
        if isinstance(current, dict):
            merged_dict = dict(current)
            for name in {name for _, new in writes for name in new}:
                found = [(place, new[name]) for place, new in writes if name in new]
                merged_dict[name] = self._write_rows(current.get(name), found)
            return merged_dict
        raise TypeError(f"cannot write into one invoke's rows of a {type(current).__name__}")

    def _merge_rows(self, current: Any, new: Any, place: Place) -> Any:
        if place[0] is None:
            return new
        if isinstance(current, torch.Tensor):
            if current.dim() == 0 or current.shape[0] != self.batch_size:
                if self.isolated:
                    raise NeedsSolo("a write to a value every row shares")
                return new
            merged = self._copy(current)
            self._own(merged, place)[...] = new
            return merged
        if isinstance(current, (tuple, list)) and isinstance(new, (tuple, list)) and len(current) == len(new):
            return type(current)(self._merge_rows(c, n, place) for c, n in zip(current, new, strict=True))
        if isinstance(current, dict) and isinstance(new, dict):
            merged_dict = dict(current)
            for name, item in new.items():
                merged_dict[name] = self._merge_rows(current.get(name), item, place)
            return merged_dict
        raise TypeError(f"cannot write a {type(new).__name__} into one invoke's rows of a {type(current).__name__}")

    # -- gradients -------------------------------------------------------------------------------
    def _backward(self, node: Node, args: list[Any]) -> None:
        loss = args[0]
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise TypeError("backward() needs a tensor that depends on the model's activations")
        self.backward_from(node.id, loss, args[1] if len(args) > 1 else None, [])

    def activation(self, nid: int) -> Any:
        """The activation object a gradient source was read from (a pipeline stage: only its own)."""
        return self.values[nid]

    def backward_from(
        self, backward: int, output: torch.Tensor, grad_output: Any, extra: list[torch.Tensor]
    ) -> list[Any]:
        """Backward from `output` for backward node `backward`: the `.grad` reads bound to it run
        from tensor hooks; returns the gradients of the `extra` tensors (a stage's input)."""
        sources: dict[int, tuple[torch.Tensor, list[_GradSource]]] = {}
        for nid in [n for t in self.grad_threads for n in t.nodes]:
            grad_node = self.nodes[nid]
            if grad_node.op not in _GRAD_OPS:
                continue
            src = grad_node.args[0].id
            if self._backward_of[nid] != backward or self.values[src] is MISSING or self.values[src] is SKIPPED:
                continue
            root, keys = self._indexed_from(src)
            value = self.activation(root)
            if value is MISSING:
                continue  # read on another stage of a pipeline: that stage gives its gradient
            if not isinstance(value, torch.Tensor):
                raise self._error(grad_node, f".grad needs a tensor, got {type(value).__name__}")
            base, rows = self._row_base.get(id(value), (value, None))
            if not base.requires_grad:
                raise self._error(grad_node, ".grad of a value that does not require grad")
            entry = sources.setdefault(id(base), (base, []))
            if all(s.src != src for s in entry[1]):
                entry[1].append(_GradSource(src, rows, keys))
        if not sources and not extra:
            return []
        self._backward_now = backward
        handles = [base.register_hook(functools.partial(self._grad_hook, srcs)) for base, srcs in sources.values()]
        retain = sum(1 for n in self.nodes if n.op == "backward") > 1
        try:
            return list(
                torch.autograd.grad(
                    output,
                    [base for base, _ in sources.values()] + extra,
                    grad_outputs=grad_output,
                    allow_unused=True,
                    retain_graph=retain,
                )[len(sources) :]
            )
        finally:
            for handle in reversed(handles):
                handle.remove()

    def _indexed_from(self, src: int) -> tuple[int, list[Any]]:
        """An indexed activation (`h[:, -1]`) as (the activation's node, the indices to apply):
        its gradient is the activation's gradient, indexed the same way."""
        keys: list[Any] = []
        node = self.nodes[src]
        while node.op == "getitem" and isinstance(node.args[0], Ref):
            parent = self.nodes[node.args[0].id]
            if not isinstance(self.values[parent.id], torch.Tensor):
                break  # e.g. output[0] of a tuple: the tensor is the activation itself
            keys.insert(0, self._resolve(node.args[1]))
            node = parent
        return node.id, keys

    def _grad_hook(self, sources: list[_GradSource], grad: torch.Tensor) -> Any:
        outer_live = self.live
        self._grad_state = {"full": grad, "sources": {s.src: s for s in sources}}
        self.live = set()
        for source in sources:
            key = GradEvent(source.src, self._backward_now)
            self.live.add(key)
            self.fired.add(key)
            self._grads[(source.src, self._backward_now)] = source.view(grad)
        try:
            self._advance_dataflow(self.grad_threads)
            return self._grad_state["full"]
        finally:
            self.live = outer_live

    def _set_grad(self, src: int, value: Any) -> None:
        source: _GradSource = self._grad_state["sources"][src]
        full = self._grad_state["full"]
        if source.keys:
            edited = full.clone()
            source.view(edited)[...] = value
            self._grad_state["full"] = edited
        else:
            self._grad_state["full"] = self._merge_rows(full, value, (source.rows, None))
        for other in self._grad_state["sources"].values():  # every gradient read later sees the edit
            self._grads[(other.src, self._backward_now)] = other.view(self._grad_state["full"])


# The ops that need the run's state; every other op of the registry (graph.ops.OPS) is plain
# (torch_ops.SIMPLE). A test checks that the two tables together cover the registry exactly.
_STATEFUL: dict[str, Callable[[Interleaver, Node, list[Any], dict[str, Any]], Any]] = {
    "output": Interleaver._op_output,
    "input": Interleaver._op_input,
    "inputs": Interleaver._op_inputs,
    "set_output": Interleaver._op_set_output,
    "set_input": Interleaver._op_set_input,
    "set_inputs": Interleaver._op_set_inputs,
    "setitem": Interleaver._op_setitem,
    "call_method": Interleaver._op_call_method,
    "call_module": Interleaver._op_call_module,
    "model_output": Interleaver._op_model_output,
    "parameter": Interleaver._op_parameter,
    "from_trace": Interleaver._op_from_trace,
    "stop": Interleaver._op_stop,
    "backward": Interleaver._op_backward,
    "grad": Interleaver._op_grad,
    "set_grad": Interleaver._op_set_grad,
}
STATEFUL_OPS = frozenset(_STATEFUL)


@dataclass(frozen=True)
class _GradSource:
    """A value whose gradient a `.grad` node reads: its node, its invoke's rows of the batched
    activation, and the indices that took it from the activation."""

    src: int
    rows: tuple[int, int] | None
    keys: list[Any]

    def view(self, grad: torch.Tensor) -> torch.Tensor:
        found = grad if self.rows is None else grad[self.rows[0] : self.rows[1]]
        for key in self.keys:
            found = found[key]
        return found
