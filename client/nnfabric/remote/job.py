"""A job on the fabric, as a researcher holds it: its state, its end, its saved values.

Usage::

    job = tracer.job                 # a `blocking=False` trace returns at once with it
    job.wait(timeout=600)            # then the trace's saved proxies have their values
    nnfabric.job(job_id).result()    # from any process: {"hidden": tensor, ...}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import RemoteError
from ..protocol import CancelReply, JobRecord

if TYPE_CHECKING:
    from ..backends import JobRequest
    from .http import FabricClient


class Job:
    """A job on the fabric. `blocking=False` traces return at once with `tracer.job`:

        job.status()          # {"state": "queued", "position": 3, ...}
        job.wait(timeout=60)  # until it ends; the trace's saved proxies then have their values
        job.result()          # {"hidden": tensor, ...}: saved values by their variable names
        job.cancel()

    `nnfabric.job(job_id)` reattaches from another process (then `result()` is the way in).
    """

    def __init__(self, fabric: FabricClient, job_id: str, request: JobRequest | None = None) -> None:
        self.fabric = fabric
        self.id = job_id
        self._request = request
        self._values: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<nnfabric.Job {self.id}>"

    def status(self) -> JobRecord:
        return self.fabric.status(self.id)

    def cancel(self) -> CancelReply:
        return self.fabric.cancel(self.id)

    def wait(self, timeout: float | None = None) -> Job:
        """Wait until the job ends; raise RemoteError (at your line) if it failed."""
        if self._values is not None:
            return self
        final = self.fabric.wait(self.id, timeout)
        if final["type"] != "completed":
            node, trace = final.get("node"), final.get("trace")
            message = final.get("message") or f"job {final['type']}"
            line = self._request.line(trace, node) if self._request else None
            raise RemoteError(f"{message} (job {self.id})", line, node, trace=trace)
        self.receive(self.fabric.result(self.id))
        return self

    def receive(self, data: bytes) -> None:
        """The job's result envelope (however it came): the trace's saved proxies get their values."""
        from ..runtime.wire import split_saved, unpack_values

        self._values = unpack_values(data)
        if self._request is not None:
            self._request.deliver(split_saved(self._values, len(self._request.graphs)))

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The saved values by the names they had in the submitting code (waits if needed)."""
        self.wait(timeout)
        assert self._values is not None
        names = self.status().get("meta", {}).get("names") or {}
        if not names:
            return dict(self._values)
        values = self._values
        return {
            name: [values.get(k) for k in key] if isinstance(key, list) else values.get(key)
            for name, key in names.items()
        }
