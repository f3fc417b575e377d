"""Tracer: the `with model.trace(...)` block that records an intervention graph, then runs it.

Usage::

    with model.trace() as tracer:
        with tracer.invoke("The Eiffel Tower is in"):
            clean = model.transformer.h[3].output[0][:, -1].save()
        with tracer.invoke("The Colosseum is in"):
            model.transformer.h[3].output[0][:, -1] = clean
            logits = model.output.logits.save()

On exit the graph runs (locally or on the fabric) and saved proxies receive their values.
"""

from __future__ import annotations

import linecache
import os
import sys
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..backends import Backend, Edit, JobRequest, Remote
from ..errors import InterventionError
from ..graph.ir import DType, Graph, Invoke, Node, Ref, SourceLine, TensorRef, relabel
from .proxy import Proxy

if TYPE_CHECKING:
    from ..graph.tree import ModuleTree
    from ..remote.client import Job
    from .envoy import Envoy
    from .session import TraceSession

ArgList = list[Any]  # `Tracer.list` shadows the builtin inside the class
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TracedModel(Protocol):
    """What tracing needs of a model (nnfabric.Model is one)."""

    _tracer: Tracer | None
    _open_session: TraceSession | None
    _tree: ModuleTree
    _edits: list[Edit]

    def _module_at(self, path: str) -> Any: ...

    def _prepare_invoke_inputs(
        self, inputs: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]: ...

    def _forward_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]: ...

    def _backend(self, remote: Remote) -> Backend: ...


def run_traces(model: TracedModel, tracers: list[Tracer], session: bool, remote: Remote, blocking: bool) -> None:
    """Run a trace (or a session's traces) on the backend `remote` selects; each tracer's saved
    proxies get their values, now or (non-blocking remote jobs) once the job is waited on."""
    backend = model._backend(remote)

    def deliver(per_trace: list[dict[int, Any]]) -> None:
        for tracer, values in zip(tracers, per_trace, strict=True):
            tracer._resolve(values)

    request = JobRequest(
        graphs=[t._graph for t in tracers],
        tensors={name: t for tracer in tracers for name, t in tracer._tensors.items()},
        deliver=deliver,
        session=session,
        blocking=blocking,
        names=_saved_names(tracers, session) if remote is True else {},
        edits=list(model._edits),
    )
    job = backend.run(request)
    for tracer in tracers:
        tracer.job = job


def _saved_names(tracers: list[Tracer], session: bool) -> dict[str, Any]:
    """Variable names of saved values in the submitting code, so a reattached job can say which is which."""
    frame = tracers[0]._frame
    if frame is None:
        return {}
    index = {id(t): i for i, t in enumerate(tracers)}

    def key(value: Any) -> str | None:
        if (
            not isinstance(value, Proxy)
            or id(value._tracer) not in index
            or value._id not in value._tracer._graph.saves
        ):
            return None
        return f"{index[id(value._tracer)]}.{value._id}" if session else str(value._id)

    names: dict[str, Any] = {}
    for name, value in frame.f_locals.items():
        if name.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and value and all(key(v) for v in value):
            names[name] = [key(v) for v in value]
        elif key(value):
            names[name] = key(value)
    return names


class Tracer:
    def __init__(
        self,
        model: TracedModel,
        inputs: tuple[Any, ...],
        input_kwargs: dict[str, Any],
        kind: Literal["trace", "generate"] = "trace",
        options: dict[str, Any] | None = None,
        remote: Remote = False,
        blocking: bool = True,
    ) -> None:
        self._model = model
        self._graph = Graph(kind=kind, options=dict(options or {}))
        self._tensors: dict[str, Any] = {}
        self._tensor_ids: dict[int, str] = {}
        self._proxies: list[Proxy] = []
        self._active = False
        self._remote = remote
        self._blocking = blocking
        self._step = 0
        self._frame: types.FrameType | None = None
        self._invoke: int | None = None
        self._implicit = bool(inputs) or bool(input_kwargs)
        self.job: Job | None = None  # the fabric's job, for remote traces
        # Inside `model.session()`: recorded now, run with the session's other traces at its end.
        self._session = model._open_session
        self._index = 0
        self._tensor_prefix = "t"
        self._imported: dict[tuple[int, int], Ref] = {}
        self._steps_blocks: list[int] = []  # steps of each open `with tracer.iter[...]` / `tracer.all()`
        if self._session is not None:
            self._index = len(self._session.tracers)
            self._tensor_prefix = f"s{self._index}_t"
            self._remote = self._session._remote
            self._blocking = self._session._blocking
        if self._implicit:
            self._graph.invokes.append(self._make_invoke(inputs, input_kwargs))
            self._invoke = 0

    # -- the block -----------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        if self._model._tracer is not None:
            raise RuntimeError("a trace on this model is already open; nested traces are not supported")
        self._frame = sys._getframe(1)
        self._model._tracer = self
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._model._tracer = None
        self._active = False
        if exc_type is not None:
            return
        if not self._graph.invokes:
            raise ValueError("the trace has no inputs: pass them to trace()/generate() or use tracer.invoke(...)")
        if self._session is not None:
            self._session.tracers.append(self)  # runs when the session ends
            return
        try:
            run_traces(self._model, [self], session=False, remote=self._remote, blocking=self._blocking)
        except InterventionError as error:
            raise self._at_user_line(error) from error.__cause__
        finally:
            self._frame = None

    def invoke(self, *inputs: Any, **kwargs: Any) -> _InvokeBlock:
        """A batch group: its reads and writes touch only its own rows. No input: the whole batch."""
        if self._implicit:
            raise ValueError("inputs were given to trace() already; pass them to tracer.invoke() instead")
        return _InvokeBlock(self, inputs, kwargs)

    @property
    def iter(self) -> _IterIndexer:
        """`for step in tracer.iter[0:3]:` or `with tracer.iter[1:]:` address generation steps."""
        return _IterIndexer(self)

    def all(self) -> _Steps:
        """Apply the block to every generation step (those that happen)."""
        return _Steps(self, 0, self._max_steps(), optional=True)

    def stop(self) -> None:
        """End the model's forward pass here; everything recorded before still runs."""
        self._record("stop", [], {})

    @property
    def output(self) -> Proxy:
        """The model's result: its output for trace(), the generated token ids for generate()."""
        result: Proxy = self._record("model_output", [], {})
        return result

    def cache(self, contains: str | None = None, inputs: bool = False) -> dict[str, Proxy]:
        """Save many modules' outputs at once, by path: every module, or those whose path has
        `contains` in it (`tracer.cache("mlp")`); with `inputs=True`, their inputs too (keys
        "<path>.input"). Modules the run does not call have no value. Remotely, within the
        model's `max_saved_bytes`."""
        found: dict[str, Proxy] = {}
        for tree in self._model._tree.walk():
            if not tree.path or (contains is not None and contains not in tree.path):
                continue
            for op, key in [("output", tree.path)] + ([("input", f"{tree.path}.input")] if inputs else []):
                proxy: Proxy = self._record(op, [tree.path, self._step, 0], {}, unordered=True)
                self._save(proxy)
                found[key] = proxy
        if not found:
            raise ValueError(f"no module path contains {contains!r}; print(model) lists them")
        return found

    def list(self) -> Proxy:
        """An empty list to `.append` values to, e.g. one per generation step."""
        result: Proxy = self._record("list", [], {})
        return result

    # -- recording -------------------------------------------------------------------------
    def _record(self, op: str, args: ArgList, kwargs: dict[str, Any], unordered: bool = False) -> Any:
        if not self._active:
            raise RuntimeError("the trace block has ended; this value can no longer be recorded")
        if self._invoke is None:
            # Nodes outside any invoke address the whole batch.
            self._graph.invokes.append(Invoke(args=None))
            self._invoke = len(self._graph.invokes) - 1
        node = Node(
            op=op,
            args=[self._encode(a) for a in args],
            kwargs={k: self._encode(v) for k, v in kwargs.items()},
            invoke=self._invoke,
            line=_user_line(),
            # An unordered read may find its module never called: then it simply has no value.
            optional=unordered,
            unordered=unordered,
        )
        self._graph.add(node)
        if op in ("setitem", "set_grad", "set_output", "set_input", "set_inputs", "backward", "stop", "append"):
            return None
        proxy = Proxy(self, node.id)
        self._proxies.append(proxy)
        return proxy

    def _encode(self, value: Any) -> Any:
        import torch

        if isinstance(value, Proxy):
            if value._resolved():
                return self._encode(value._value)
            if value._tracer is not self:
                return self._import(value)
            return Ref(value._id)
        if isinstance(value, torch.Tensor):
            name = self._tensor_ids.get(id(value))
            if name is None:
                name = f"{self._tensor_prefix}{len(self._tensors)}"
                self._tensors[name] = value
                self._tensor_ids[id(value)] = name
            return TensorRef(name)
        if isinstance(value, torch.dtype):
            return DType(str(value).removeprefix("torch."))
        if isinstance(value, torch.Size):
            return tuple(value)
        if isinstance(value, tuple):
            return tuple(self._encode(v) for v in value)
        if isinstance(value, list):
            return [self._encode(v) for v in value]
        if isinstance(value, dict):
            return {str(k): self._encode(v) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(self._encode(value.start), self._encode(value.stop), self._encode(value.step))
        if value is None or value is Ellipsis or isinstance(value, (bool, int, float, str)):
            return value
        from .envoy import Envoy

        if isinstance(value, Envoy):
            raise TypeError(f"{value._path or 'the model'} is a module; use its .output or .input")
        raise TypeError(f"a value of type {type(value).__name__} cannot be used inside a trace")

    def _import(self, proxy: Proxy) -> Ref:
        """A value of an earlier trace of the same session, fetched where the job runs."""
        source = proxy._tracer
        if self._session is None or source._session is not self._session or source._index >= self._index:
            raise ValueError(
                "a value from another trace can be used only in a later trace of the same model.session(); "
                "otherwise .save() it and use .value"
            )
        key = (source._index, proxy._id)
        if key not in self._imported:
            self._imported[key] = Ref(self._record("from_trace", [source._index, proxy._id], {})._id)
        return self._imported[key]

    def _make_invoke(self, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Invoke:
        kwargs, forward = self._model._forward_kwargs(kwargs)
        self._add_forward_kwargs(forward)
        if len(inputs) == 0 and not kwargs:
            return Invoke(args=None)
        args, own = self._model._prepare_invoke_inputs(inputs, kwargs)
        # A dict input may carry forward keywords too ({"input_ids": ..., "output_attentions": True}).
        own, forward = self._model._forward_kwargs(own)
        self._add_forward_kwargs(forward)
        return Invoke(args=[self._encode(a) for a in args], kwargs={k: self._encode(v) for k, v in own.items()})

    def _add_forward_kwargs(self, forward: dict[str, Any]) -> None:
        if not forward:
            return
        current = self._graph.options.setdefault("forward", {})
        for name, value in forward.items():
            if name in current and current[name] != self._encode(value):
                raise ValueError(f"{name}={value!r} differs between invokes; one forward pass takes one value")
            current[name] = self._encode(value)

    def _save(self, proxy: Proxy) -> None:
        if any(steps > 1 for steps in self._steps_blocks):
            # The block's body is recorded once and repeated per step: one saved value cannot
            # hold every step's, and keeping only the last one would be silently wrong.
            raise ValueError(
                ".save() inside a `with` block over several generation steps would keep only one step's "
                "value: collect them with `values = tracer.list()` before the block and `values.append(x)` "
                "inside it, or loop with `for step in tracer.iter[...]:` and save each step's value"
            )
        if proxy._id not in self._graph.saves:
            self._graph.saves.append(proxy._id)

    def _module_event(self, op: str, envoy: Envoy, value: Any = None, with_value: bool = False) -> Any:
        args: ArgList = [envoy._path, self._step, envoy._call]
        if with_value:
            args.append(value)
        return self._record(op, args, {})

    def _max_steps(self) -> int:
        if self._graph.kind != "generate":
            return 1
        return int(self._graph.options.get("max_new_tokens", 1))

    def _resolve(self, values: dict[int, Any]) -> None:
        for proxy in self._proxies:
            if proxy._id in values:
                object.__setattr__(proxy, "_value", values[proxy._id])

    def _at_user_line(self, error: InterventionError) -> InterventionError:
        """Give the error a traceback that ends at the user's own line in the `with` block."""
        frame = self._frame
        line = error.line
        if frame is not None and line is not None and frame.f_code.co_filename == line.file:
            tb = types.TracebackType(None, frame, _instruction_at(frame.f_code, line.line), line.line)
            return error.with_traceback(tb)
        return error


class _InvokeBlock:
    def __init__(self, tracer: Tracer, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._tracer = tracer
        self._inputs = inputs
        self._kwargs = kwargs
        self._previous: int | None = None

    def __enter__(self) -> Tracer:
        tracer = self._tracer
        self._previous = tracer._invoke
        tracer._graph.invokes.append(tracer._make_invoke(self._inputs, self._kwargs))
        tracer._invoke = len(tracer._graph.invokes) - 1
        return tracer

    def __exit__(self, *exc: Any) -> None:
        self._tracer._invoke = None


class _IterIndexer:
    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def __getitem__(self, key: int | slice) -> _Steps:
        limit = self._tracer._max_steps()
        if isinstance(key, int):
            if not 0 <= key < limit:
                raise IndexError(f"step {key} is out of range: this run has {limit} steps (0..{limit - 1})")
            return _Steps(self._tracer, key, key + 1, optional=False)
        start, stop, step = key.indices(limit)
        if step != 1:
            raise ValueError("tracer.iter takes contiguous steps, e.g. tracer.iter[1:4]")
        return _Steps(self._tracer, start, stop, optional=False)


class _Steps:
    """Generation steps. Iterate it to unroll a loop body per step, or use it as a `with` block."""

    def __init__(self, tracer: Tracer, start: int, stop: int, optional: bool) -> None:
        self._tracer = tracer
        self._start = start
        self._stop = stop
        self._optional = optional
        self._first = 0
        self._saved_step = 0

    def __iter__(self) -> Iterator[int]:
        tracer = self._tracer
        previous = tracer._step
        try:
            for step in range(self._start, self._stop):
                tracer._step = step
                yield step
        finally:
            tracer._step = previous

    def __enter__(self) -> _Steps:
        self._saved_step = self._tracer._step
        self._tracer._step = self._start
        self._first = len(self._tracer._graph.nodes)
        self._tracer._steps_blocks.append(self._stop - self._start)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        tracer = self._tracer
        tracer._step = self._saved_step
        tracer._steps_blocks.pop()
        if exc_type is not None:
            return
        _replicate(tracer, self._first, self._start, self._stop, self._optional)


def _replicate(tracer: Tracer, first: int, start: int, stop: int, optional: bool) -> None:
    """Copy the nodes recorded in a steps block once per further step, shifting their step."""
    from ..graph.ops import OPS

    graph = tracer._graph
    block = graph.nodes[first:]
    last_copy: dict[int, int] = {n.id: n.id for n in block}
    for step in range(start + 1, stop):
        mapping: dict[int, int] = {}
        for node in block:
            args = [_remap(a, mapping) for a in node.args]
            if OPS[node.op].module_event:
                args[1] = step
            copy = graph.add(
                Node(
                    op=node.op,
                    args=args,
                    kwargs={k: _remap(v, mapping) for k, v in node.kwargs.items()},
                    invoke=node.invoke,
                    line=node.line,
                    optional=optional or node.optional,
                    unordered=node.unordered,
                )
            )
            mapping[node.id] = copy.id
            last_copy[node.id] = copy.id
    # A value saved inside the block means its value at the last step, as a proxy shows it.
    graph.saves = [last_copy.get(s, s) for s in graph.saves]
    for proxy in tracer._proxies:
        if proxy._id in last_copy:
            object.__setattr__(proxy, "_id", last_copy[proxy._id])


def _remap(value: Any, mapping: dict[int, int]) -> Any:
    return relabel(value, lambda node: mapping.get(node, node))


def _instruction_at(code: types.CodeType, lineno: int) -> int:
    """An instruction offset on `lineno`: tracebacks take their line (and columns) from it."""
    for index, (start, *_rest) in enumerate(code.co_positions()):
        if start == lineno:
            return index * 2
    return -1


def _user_line() -> SourceLine | None:
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return None
    filename = frame.f_code.co_filename
    lineno = frame.f_lineno
    return SourceLine(filename, lineno, linecache.getline(filename, lineno).strip())
