"""`remote=True`: a job on the fabric, its persistent edits registered there first.

    RemoteBackend(client, "gpt2").run(request)      # submits; blocking requests wait for the end
"""

from __future__ import annotations

from typing import Any

from ..errors import RemoteError
from ..graph.ir import Graph
from ..remote.http import FabricClient
from ..remote.job import Job
from . import Edit, JobEnded, JobRequest


class RemoteBackend:
    """`remote=True`: the job runs on the fabric as model `name`."""

    def __init__(self, fabric: FabricClient, name: str) -> None:
        self.fabric = fabric
        self.name = name

    def run(self, request: JobRequest) -> Job:
        body = self.envelope(request)
        job = Job(self.fabric, "", request, self.name)
        try:
            job.id = self.fabric.submit(body)["id"]
        except RemoteError as error:
            line = request.line(error.trace, error.node) or error.line
            raise RemoteError(error.reason, line, error.node, error.status, error.trace) from None
        if request.blocking:
            job.wait()
        return job

    def run_many(self, requests: list[JobRequest], ended: JobEnded) -> list[Job | None]:
        """A sweep: every job over one connection (remote.sweep), each delivered as it ends."""
        from ..remote.sweep import SocketSender

        bodies = [self.envelope(request) for request in requests]
        jobs = [Job(self.fabric, "", request, self.name) for request in requests]

        def job_ended(index: int, job_id: str | None, result: bytes | None, error: RemoteError | None) -> None:
            job = jobs[index]
            job.id = job_id or ""
            if error is None and result is not None:
                try:
                    job.receive(result)
                except Exception as exc:  # a result this client cannot read is that job's failure
                    error = RemoteError(f"job {job_id}: its result could not be read: {exc}")
            if error is not None:
                line = requests[index].line(error.trace, error.node) or error.line
                error = RemoteError(error.reason, line, error.node, error.status, error.trace)
            ended(index, error)

        SocketSender(self.fabric).run(bodies, job_ended)
        return list(jobs)

    def envelope(self, request: JobRequest) -> bytes:
        """The job as the fabric takes it, naming its edits (registered here the first time)."""
        from ..runtime.wire import pack_job

        extra: dict[str, Any] = {"model": self.name, "names": request.names}
        if request.edits:
            extra["edits"] = [self.register(edit) for edit in request.edits]
        return pack_job(request.graphs, request.tensors, request.session, extra)

    def register(self, edit: Edit) -> str:
        """The edit's id on this fabric for this model, registering it the first time."""
        from ..runtime.wire import pack_job

        where = (self.fabric.url, self.name)
        if where not in edit.registered:
            body = pack_job([edit.graph], edit.tensors, False, {"model": self.name})
            try:
                edit.registered[where] = self.fabric.add_edit(self.name, body)["id"]
            except RemoteError as error:
                node = error.node if _node_in(edit.graph, error.node) else None
                line = error.line or (edit.graph.nodes[node].line if node is not None else None)
                raise RemoteError(error.reason, line, error.node, error.status, error.trace) from None
        return edit.registered[where]


def _node_in(graph: Graph, node: int | None) -> bool:
    return isinstance(node, int) and 0 <= node < len(graph.nodes)
