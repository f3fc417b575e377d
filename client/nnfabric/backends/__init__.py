"""Where a trace runs, chosen when it opens: here, here through the wire format, or on the fabric.

Usage::

    with model.trace(prompt):                  # local.LocalBackend: this process, no encoding
    with model.trace(prompt, remote="local"):  # local.LoopbackBackend: encode -> decode -> run ->
                                               #   encode -> decode, as a job travels, with local limits
    with model.trace(prompt, remote=True):     # remote.RemoteBackend: a job on the fabric
    backend = select(remote, ...)              # the one place that picks

Tracing hands every backend the same `JobRequest` (graphs, tensors, and a `deliver` callback
that gives each trace its saved values), so no backend knows the tracing classes and the remote
code never imports the model classes. The test suite makes loopback the default for `remote=False`
(`DEFAULT_LOCAL`), so every local test also checks the wire round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..errors import InterventionError
from ..graph.ir import Graph, SourceLine

if TYPE_CHECKING:
    from ..remote.http import FabricClient
    from ..remote.job import Job

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
        from ..graph.merging import apply_edits

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


# A sweep's report of one job's end: its index, and its error (None: its values were delivered).
JobEnded = Callable[[int, "InterventionError | None"], None]


class Backend(Protocol):
    def run(self, request: JobRequest) -> Job | None:
        """Run (or submit) the job; saved values arrive through `request.deliver`. A remote
        backend returns the job (its values arrive once it is waited on)."""
        ...

    def run_many(self, requests: list[JobRequest], ended: JobEnded) -> list[Job | None]:
        """Run many independent jobs (a sweep), each delivered as it ends, and `ended` told; one
        job's failure is reported, not raised, and the others still run."""
        ...


def run_each(backend: Backend, requests: list[JobRequest], ended: JobEnded) -> list[Job | None]:
    """A sweep run here: one job after another."""
    for index, request in enumerate(requests):
        try:
            backend.run(request)
        except InterventionError as error:
            ended(index, error)
        else:
            ended(index, None)
    return [None] * len(requests)


def select(
    remote: Remote,
    *,
    adapter: Callable[[], Any] | None,
    paths: frozenset[str],
    fabric: FabricClient | None,
    name: str | None,
) -> Backend:
    """Where a trace opened with `remote=` runs: on the fabric as model `name` (True), here
    through the wire format ("local", or the test suite's DEFAULT_LOCAL), or here. `adapter`
    makes the local model's adapter (None: the model is hosted on the fabric)."""
    if remote is True:
        from ..remote.config import default_fabric
        from .remote import RemoteBackend

        if not name:
            raise InterventionError(
                "this model has no name on the fabric: use fabric.model(name) or LanguageModel(..., remote_name=)"
            )
        return RemoteBackend(fabric or default_fabric(), name)
    if remote not in (False, "local"):
        raise ValueError(f"remote must be True, False or 'local', not {remote!r}")
    if adapter is None:
        raise InterventionError("this model is hosted on the fabric: trace it with remote=True")
    from .local import LocalBackend, LoopbackBackend

    loopback = remote == "local" or DEFAULT_LOCAL == "loopback"
    return (LoopbackBackend if loopback else LocalBackend)(adapter(), paths)
