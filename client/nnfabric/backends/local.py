"""Running a job in this process: directly (LocalBackend), or through the wire format exactly as
a remote job travels, validated by the same function as on the fabric (LoopbackBackend).

    LocalBackend(adapter, model.paths).run(request)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import InterventionError
from ..graph.validate import GraphError, Limits, validate_session
from . import JobEnded, JobRequest, run_each

if TYPE_CHECKING:
    from ..remote.job import Job


class LocalBackend:
    """This process, on the model object itself."""

    def __init__(self, adapter: Any, module_paths: set[str] | frozenset[str]) -> None:
        self.adapter = adapter
        self.module_paths = module_paths
        self.limits = Limits.local()

    def run(self, request: JobRequest) -> None:
        from ..runtime.execute import run_session

        request.apply_edits_here()
        try:
            validate_session(request.graphs, self.limits, module_paths=self.module_paths)
        except GraphError as exc:
            raise _at_node(request, exc) from None
        request.deliver(run_session(request.graphs, request.tensors, self.adapter))

    def run_many(self, requests: list[JobRequest], ended: JobEnded) -> list[Job | None]:
        return run_each(self, requests, ended)


class LoopbackBackend(LocalBackend):
    """This process, but the job and its result travel through the wire format exactly as a
    remote job does (and are validated by the same function as on the fabric)."""

    def run(self, request: JobRequest) -> None:
        from ..graph.codec import decode_request
        from ..runtime import wire
        from ..runtime.execute import run_session

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
