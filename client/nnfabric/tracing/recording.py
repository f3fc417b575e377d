"""Recording: what one `with model.trace(...)` (or `model.edit()`) block builds, and the one
object the rest of tracing records through.

Usage::

    recording = Recording(model, kind="trace")
    recording.open(frame)                               # the block starts (`Tracer.__enter__`)
    proxy = recording.record("output", ["transformer.h.0", 0, 0], {})
    recording.save(proxy)
    recording.close()
    run_recordings(model, [recording], session=False, remote=False, blocking=True)

A recording owns the graph being built, the tensors it carries (encoded by the runtime's one
encoder), the invoke and generation step being recorded, the proxies it handed out, and the
user's frame, for errors at the user's own line. `Tracer`, `Proxy`, `Envoy`, `TraceSession` and
`EditBlock` use only its public methods.
"""

from __future__ import annotations

import linecache
import os
import sys
import types
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..backends import Backend, Edit, JobRequest, Remote
from ..errors import InterventionError
from ..graph.ir import Graph, Invoke, Node, Ref, SourceLine
from ..graph.merging import replicate_steps
from ..runtime.values import ValueEncoder
from .envoy import Envoy, envoy_path
from .proxy import Proxy, deliver, is_resolved, node_of, recording_of, retarget, value_of

if TYPE_CHECKING:
    from ..errors import InterventionError
    from ..graph.tree import ModuleTree
    from ..remote.job import Job
    from .session import TraceSession
    from .sweep import Sweep

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ops that record a change, not a value: they hand back no proxy.
_NO_VALUE = frozenset({"setitem", "set_grad", "set_output", "set_input", "set_inputs", "backward", "stop", "append"})


class TracedModel(Protocol):
    """What tracing needs of a model (nnfabric.Model is one): its seam for recording."""

    open_recording: Recording | None  # the trace (or edit) block open on it
    open_session: TraceSession | None
    open_sweep: Sweep | None  # the sweep its traces join as jobs

    @property
    def tree(self) -> ModuleTree: ...
    @property
    def paths(self) -> frozenset[str]: ...
    @property
    def edits(self) -> list[Edit]: ...

    def module_at(self, path: str) -> Any: ...
    def invoke_inputs(self, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]: ...
    def forward_keywords(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def backend(self, remote: Remote) -> Backend: ...


class Recording:
    def __init__(
        self,
        model: TracedModel,
        kind: Literal["trace", "generate"] = "trace",
        options: dict[str, Any] | None = None,
        *,
        keeps_values: bool = True,
    ) -> None:
        self.model = model
        self.graph = Graph(kind=kind, options=dict(options or {}))
        self.proxies: list[Proxy] = []
        self.active = False
        self.frame: types.FrameType | None = None
        self.invoke: int | None = None  # the invoke being recorded; None: the whole batch
        self.step = 0  # the generation step being recorded
        self.steps_blocks: list[int] = []  # steps of each open `with tracer.iter[...]` / `tracer.all()`
        self.job: Job | None = None  # the fabric's job, once a remote run is submitted
        self.failure: InterventionError | None = None  # why its job failed (in a sweep, which goes on)
        self.keeps_values = keeps_values  # an edit keeps none
        # Inside `model.session()`: recorded now, run with the session's other traces at its end.
        self.session = model.open_session
        self.index = len(self.session.recordings) if self.session is not None else 0
        self._imported: dict[tuple[int, int], Ref] = {}
        prefix = f"s{self.index}_t" if self.session is not None else "t"
        self._encoder = ValueEncoder(prefix, other=self._encode_other, what="a value of type {} cannot be used inside a trace")

    @property
    def tensors(self) -> dict[str, Any]:
        return self._encoder.tensors

    # -- the block -----------------------------------------------------------------------------
    def open(self, frame: types.FrameType | None, *models: TracedModel) -> None:
        """The block starts: recording is on, for this recording's model and `models` too (an
        edit records writes made on either object)."""
        for model in (self.model, *models):
            if model.open_recording is not None:
                raise RuntimeError("a trace on this model is already open; nested traces are not supported")
        for model in (self.model, *models):
            model.open_recording = self
        self.frame = frame
        self.active = True

    def close(self, *models: TracedModel) -> None:
        for model in (self.model, *models):
            model.open_recording = None
        self.active = False

    def now_open(self) -> Recording | None:
        """The recording open on this model now (a later trace of the same session, say)."""
        return self.model.open_recording

    # -- recording -----------------------------------------------------------------------------
    def record(self, op: str, args: list[Any], kwargs: dict[str, Any], unordered: bool = False) -> Any:
        """Add a node for `op`; a proxy for its value (None for ops that only change something)."""
        if not self.active:
            raise RuntimeError("the trace block has ended; this value can no longer be recorded")
        if self.invoke is None:
            # Nodes outside any invoke address the whole batch.
            self.graph.invokes.append(Invoke(args=None))
            self.invoke = len(self.graph.invokes) - 1
        node = Node(
            op=op,
            args=[self.encode(a) for a in args],
            kwargs={k: self.encode(v) for k, v in kwargs.items()},
            invoke=self.invoke,
            line=user_line(),
            # An unordered read may find its module never called: then it simply has no value.
            optional=unordered,
            unordered=unordered,
        )
        self.graph.add(node)
        if op in _NO_VALUE:
            return None
        proxy = Proxy(self, node.id)
        self.proxies.append(proxy)
        return proxy

    def module_event(self, op: str, path: str, call: int, value: Any = None, with_value: bool = False) -> Any:
        """A read or write of a module's value at its `call`-th call in the current step."""
        args: list[Any] = [path, self.step, call]
        if with_value:
            args.append(value)
        return self.record(op, args, {})

    def encode(self, value: Any) -> Any:
        """A Python or torch value as a graph value: tensors travel beside the graph, proxies
        become references (a value of an earlier trace of the session is fetched where it runs)."""
        return self._encoder.encode(value)

    def _encode_other(self, value: Any) -> Any:
        if isinstance(value, Proxy):
            if is_resolved(value):
                return self.encode(value_of(value))
            if recording_of(value) is not self:
                return self._import(value)
            return Ref(node_of(value))
        if isinstance(value, Envoy):
            raise TypeError(f"{envoy_path(value) or 'the model'} is a module; use its .output or .input")
        return NotImplemented

    def _import(self, proxy: Proxy) -> Ref:
        source = recording_of(proxy)
        if self.session is None or source.session is not self.session or source.index >= self.index:
            raise ValueError(
                "a value from another trace can be used only in a later trace of the same model.session(); "
                "otherwise .save() it and use .value"
            )
        key = (source.index, node_of(proxy))
        if key not in self._imported:
            self._imported[key] = Ref(node_of(self.record("from_trace", [source.index, node_of(proxy)], {})))
        return self._imported[key]

    def add_invoke(self, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """A batch group for these inputs (none: the whole batch); its index."""
        own, forward = self.model.forward_keywords(kwargs)
        self._add_forward_keywords(forward)
        if len(inputs) == 0 and not own:
            self.graph.invokes.append(Invoke(args=None))
        else:
            args, own = self.model.invoke_inputs(inputs, own)
            # A dict input may carry forward keywords too ({"input_ids": ..., "output_attentions": True}).
            own, forward = self.model.forward_keywords(own)
            self._add_forward_keywords(forward)
            self.graph.invokes.append(
                Invoke(args=[self.encode(a) for a in args], kwargs={k: self.encode(v) for k, v in own.items()})
            )
        return len(self.graph.invokes) - 1

    def _add_forward_keywords(self, forward: dict[str, Any]) -> None:
        if not forward:
            return
        current = self.graph.options.setdefault("forward", {})
        for name, value in forward.items():
            if name in current and current[name] != self.encode(value):
                raise ValueError(f"{name}={value!r} differs between invokes; one forward pass takes one value")
            current[name] = self.encode(value)

    def save(self, proxy: Proxy) -> None:
        if not self.keeps_values:
            raise ValueError("an edit keeps no values: .save() belongs in the traces that use the edited model")
        if any(steps > 1 for steps in self.steps_blocks):
            # The block's body is recorded once and repeated per step: one saved value cannot
            # hold every step's, and keeping only the last one would be silently wrong.
            raise ValueError(
                ".save() inside a `with` block over several generation steps would keep only one step's "
                "value: collect them with `values = tracer.list()` before the block and `values.append(x)` "
                "inside it, or loop with `for step in tracer.iter[...]:` and save each step's value"
            )
        if node_of(proxy) not in self.graph.saves:
            self.graph.saves.append(node_of(proxy))

    def is_saved(self, node: int) -> bool:
        return node in self.graph.saves

    def max_steps(self) -> int:
        if self.graph.kind != "generate":
            return 1
        return int(self.graph.options.get("max_new_tokens", 1))

    def repeat_steps(self, first: int, start: int, stop: int, optional: bool) -> None:
        """Repeat the nodes recorded since node `first` (for step `start`) for each step up to
        `stop`; a proxy from the block then stands for its value at the last step."""
        last_copy = replicate_steps(self.graph, first, start, stop, optional)
        for proxy in self.proxies:
            if node_of(proxy) in last_copy:
                retarget(proxy, last_copy[node_of(proxy)])

    # -- results -------------------------------------------------------------------------------
    def resolve(self, values: dict[int, Any]) -> None:
        """Hand each proxy whose node was saved its value."""
        for proxy in self.proxies:
            if node_of(proxy) in values:
                deliver(proxy, values[node_of(proxy)])

    def at_user_line(self, error: InterventionError) -> InterventionError:
        """Give the error a traceback that ends at the user's own line in the `with` block."""
        frame = self.frame
        line = error.line
        if frame is not None and line is not None and frame.f_code.co_filename == line.file:
            tb = types.TracebackType(None, frame, _instruction_at(frame.f_code, line.line), line.line)
            return error.with_traceback(tb)
        return error


def run_recordings(
    model: TracedModel, recordings: list[Recording], session: bool, remote: Remote, blocking: bool
) -> None:
    """Run a trace (or a session's traces) on the backend `remote` selects; each recording's
    saved proxies get their values, now or (non-blocking remote jobs) once the job is waited on."""
    backend = model.backend(remote)

    def deliver_all(per_trace: list[dict[int, Any]]) -> None:
        for recording, values in zip(recordings, per_trace, strict=True):
            recording.resolve(values)

    request = JobRequest(
        graphs=[r.graph for r in recordings],
        tensors={name: t for r in recordings for name, t in r.tensors.items()},
        deliver=deliver_all,
        session=session,
        blocking=blocking,
        names=_saved_names(recordings, session) if remote is True else {},
        edits=list(model.edits),
    )
    if model.open_sweep is not None:
        model.open_sweep.add(request, recordings)  # runs, with the sweep's other jobs, when it ends
        return
    job = backend.run(request)
    for recording in recordings:
        recording.job = job


def _saved_names(recordings: list[Recording], session: bool) -> dict[str, Any]:
    """Variable names of saved values in the submitting code, so a reattached job can say which is which."""
    frame = recordings[0].frame
    if frame is None:
        return {}
    index = {id(r): i for i, r in enumerate(recordings)}

    def key(value: Any) -> str | None:
        if not isinstance(value, Proxy) or id(recording_of(value)) not in index:
            return None
        owner, node = recording_of(value), node_of(value)
        if not owner.is_saved(node):
            return None
        return f"{index[id(owner)]}.{node}" if session else str(node)

    names: dict[str, Any] = {}
    for name, value in frame.f_locals.items():
        if name.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and value and all(key(v) for v in value):
            names[name] = [key(v) for v in value]
        elif key(value):
            names[name] = key(value)
    return names


def _instruction_at(code: types.CodeType, lineno: int) -> int:
    """An instruction offset on `lineno`: tracebacks take their line (and columns) from it."""
    for index, (start, *_rest) in enumerate(code.co_positions()):
        if start == lineno:
            return index * 2
    return -1


def user_line() -> SourceLine | None:
    """The line of the user's code (the first frame outside this package) now running."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return None
    filename = frame.f_code.co_filename
    lineno = frame.f_lineno
    return SourceLine(filename, lineno, linecache.getline(filename, lineno).strip())
