"""Where a trace runs, chosen when it opens: here, here through the wire format, or on the fabric.

Usage::

    with model.trace(prompt):                  # LocalBackend: this process, no encoding
    with model.trace(prompt, remote="local"):  # LoopbackBackend: encode -> decode -> run -> encode
                                               #   -> decode, as a job travels, with local limits
    with model.trace(prompt, remote=True):     # remote.RemoteBackend: a job on the fabric

Tracing hands every backend the same `JobRequest` (graphs, tensors, and a `deliver` callback
that gives each trace its saved values), so no backend knows the tracing classes and the remote
code never imports the model classes. The test suite makes loopback the default for `remote=False`
(`DEFAULT_LOCAL`), so every local test also checks the wire round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .errors import InterventionError
from .graph.ir import Graph, SourceLine
from .graph.validate import GraphError, Limits, validate_session

if TYPE_CHECKING:
    from .remote.client import Job

Remote = bool | Literal["local"]
# What `remote=False` means: "local", or "loopback" (the test suite's choice).
DEFAULT_LOCAL: Literal["local", "loopback"] = "local"


@dataclass(eq=False)
class Edit:
    """A persistent edit (`model.edit()`): its graph, its tensors, and its id on each fabric and
    model it was registered with (a remote job names it rather than carrying it)."""

    graph: Graph
    tensors: dict[str, Any]
    registered: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass
class JobRequest:
    """One job: a trace's graph, or a session's graphs run in order, and the tensors they carry."""

    graphs: list[Graph]
    tensors: dict[str, Any]
    # Hands each trace (in order) its saved values, by node id.
    deliver: Callable[[list[dict[int, Any]]], None]
    session: bool = False
    blocking: bool = True
    # Saved values' variable names in the submitting code, so a reattached job can name them.
    names: dict[str, Any] = field(default_factory=dict)
    # The model's persistent edits, applied before each trace's own nodes.
    edits: list[Edit] = field(default_factory=list)

    def apply_edits_here(self) -> None:
        """Merge the edits into the graphs (a local run); node ids of the traces stay as they were."""
        if not self.edits:
            return
        from .graph.edits import apply_edits

        pairs = [(edit.graph, f"edit{i}_") for i, edit in enumerate(self.edits)]
        self.graphs = [apply_edits(graph, pairs) for graph in self.graphs]
        for i, edit in enumerate(self.edits):
            self.tensors.update({f"edit{i}_{name}": t for name, t in edit.tensors.items()})
        self.edits = []

    def line(self, trace: int | None, node: int | None) -> SourceLine | None:
        """The user's line that recorded `node` of `trace`, if both exist."""
        index = trace if isinstance(trace, int) and 0 <= trace < len(self.graphs) else 0
        graph = self.graphs[index]
        if not isinstance(node, int) or not 0 <= node < len(graph.nodes):
            return None
        return graph.nodes[node].line


class Backend(Protocol):
    def run(self, request: JobRequest) -> Job | None:
        """Run (or submit) the job; saved values arrive through `request.deliver`. A remote
        backend returns the job (its values arrive once it is waited on)."""
        ...


class LocalBackend:
    """This process, on the model object itself."""

    def __init__(self, adapter: Any, module_paths: set[str] | frozenset[str]) -> None:
        self.adapter = adapter
        self.module_paths = module_paths
        self.limits = Limits.local()

    def run(self, request: JobRequest) -> None:
        from .runtime.execute import run_session

        request.apply_edits_here()
        try:
            validate_session(request.graphs, self.limits, module_paths=self.module_paths)
        except GraphError as exc:
            raise _at_node(request, exc) from None
        request.deliver(run_session(request.graphs, request.tensors, self.adapter))


class LoopbackBackend(LocalBackend):
    """This process, but the job and its result travel through the wire format exactly as a
    remote job does (and are validated by the same function as on the fabric)."""

    def run(self, request: JobRequest) -> None:
        from .graph.codec import decode_request
        from .runtime import wire
        from .runtime.execute import run_session

        request.apply_edits_here()
        data = wire.pack_job(request.graphs, request.tensors, request.session)
        try:
            graphs, blob = decode_request(data, self.limits, self.module_paths)
        except GraphError as exc:
            raise _at_node(request, exc) from None
        saved = run_session(graphs, wire.load_blob(blob), self.adapter)
        request.deliver(wire.split_saved(wire.unpack_values(wire.pack_saved(saved, request.session)), len(graphs)))


def _at_node(request: JobRequest, exc: GraphError) -> InterventionError:
    return InterventionError(str(exc), exc.line or request.line(exc.trace, exc.node), exc.node, exc.trace)


def local_backend(adapter: Any, module_paths: set[str] | frozenset[str], loopback: bool) -> Backend:
    return LoopbackBackend(adapter, module_paths) if loopback else LocalBackend(adapter, module_paths)
